"""The worker processes of `cnnlab-bench`: one measurement of one contender each.

`common` holds the spec a worker receives and the timing code both contenders share;
`cnnlab_worker` trains through cnnlab's own step and loop helpers (JAX), `torch_worker` trains
`torch_nets` in plain PyTorch eager. Neither this package nor `common` imports JAX or PyTorch, so
each worker loads only its own framework.
"""
