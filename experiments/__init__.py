"""Entry points (`cnnlab-train`, `cnnlab-inspect`, `cnnlab-predict`): where Hydra and W&B meet
the library. The experiment presets they run live in `conf/experiment/`."""
