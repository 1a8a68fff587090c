"""Checkpoints and exact resume, in-process: a stopped run resumed from its checkpoint ends
bit-identical to an uninterrupted one; damaged checkpoints are named and skipped; a non-finite
state is never saved; weights-only starts; a checkpoint of an earlier release still loads."""

import dataclasses
import json
import shutil
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
import yaml

from cnnlab import checkpoint
from cnnlab.config import (
    CheckpointConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
    from_dict,
)
from cnnlab.errors import CnnlabError, ConfigError
from cnnlab.models import variables_like
from cnnlab.parallel import put, replicated
from cnnlab.tracking import Trackers
from cnnlab.tracking.local import LocalTracker
from cnnlab.train.loop import Hooks, Lanes, LoopState, fit
from cnnlab.train.run import initial_state, prepare, run, state_tree
from tests.conftest import final_params, history, needs_fashion_mnist, small_config

pytestmark = needs_fashion_mnist
GOLDEN = Path(__file__).parent / "data" / "golden"


def resumable_config(**changes):
    """Two epochs of 15 steps, a checkpoint every 4 steps and each epoch end; dropout on, so that
    the per-step keys matter too."""
    cfg = small_config(
        model=ModelConfig(padding=[2, 0], dropout=0.2),
        data=dataclasses.replace(small_config().data, train_limit=1000),
        train=TrainConfig(epochs=2, batch_size=64, log_every_steps=3),
        checkpoint=CheckpointConfig(every_steps=4, keep=3),
    )
    return dataclasses.replace(cfg, **changes)


class StopAfter:
    """A `stop` that turns true after n steps of this attempt (the loop asks once per step)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


@pytest.fixture(scope="module")
def prepared():
    return prepare(resumable_config())


def train(run_dir: Path, prepared, cfg=None, stop=lambda: False) -> dict:
    run_dir.mkdir(exist_ok=True)
    cfg = cfg or resumable_config()
    return run(cfg, run_dir, Trackers(LocalTracker(run_dir)), prepared=prepared, stop=stop)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prepared):
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    summary = train(run_dir, prepared)
    assert summary["status"] == "ok"
    return run_dir, summary


# steps trained by each stopped attempt: 5; 1, then to the first epoch's end, then 1 more; 29
@pytest.mark.parametrize("stops", [[5], [1, 14, 1], [29]], ids=["mid-epoch", "epoch-end", "last"])
def test_stopped_and_resumed_run_is_bit_identical(tmp_path, prepared, uninterrupted, stops):
    whole, whole_summary = uninterrupted
    run_dir = tmp_path / "run"
    for n in stops:
        summary = train(run_dir, prepared, stop=StopAfter(n))
        assert summary["status"] == "preempted", summary
        assert f"after step {summary['steps']}" in summary["error"]
    summary = train(run_dir, prepared)
    assert summary["status"] == "ok" and summary["resumed_from_step"] == sum(stops)
    chex.assert_trees_all_equal(final_params(run_dir), final_params(whole))
    assert history(run_dir) == history(whole)  # no step logged twice or missing
    for key in ("test/accuracy", "train/loss", "val/best_accuracy", "val/best_epoch", "epochs"):
        assert summary[key] == whole_summary[key], key


def test_a_broken_resume_is_caught(tmp_path, prepared, uninterrupted, monkeypatch):
    """The comparison above can fail: a resume that loses the data order ends elsewhere."""
    run_dir = tmp_path / "run"
    assert train(run_dir, prepared, stop=StopAfter(5))["status"] == "preempted"
    from cnnlab.train import loop

    monkeypatch.setattr(loop, "epoch_order", lambda seed, epoch, n: loop.np.arange(n))
    assert train(run_dir, prepared)["status"] == "ok"
    same = jax.tree.map(np.array_equal, final_params(run_dir), final_params(uninterrupted[0]))
    assert not all(jax.tree.leaves(same))


def newest(run_dir: Path) -> Path:
    return max((run_dir / "checkpoints").iterdir(), key=lambda p: int(p.name))


def test_damaged_checkpoints_are_named_and_skipped(tmp_path, prepared, uninterrupted, capfd):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run_dir)
    checkpoints = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [24, 28, 30]  # keep=3 of every 4 steps and the epoch ends (15, 30)
    # alter one byte of the newest, truncate the next one: both are skipped with a warning
    data = max((newest(run_dir) / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    second = run_dir / "checkpoints" / "28" / "state"
    for f in second.rglob("d/*"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    capfd.readouterr()
    summary = train(run_dir, prepared)
    err = capfd.readouterr().err
    assert "checkpoint step 30 is " in err and "checkpoints/30/state" in err
    assert "checkpoint step 28 is " in err and "checkpoints/28/state" in err
    assert "resuming from the previous checkpoint, step 24" in err
    assert summary["status"] == "ok" and summary["resumed_from_step"] == 24
    chex.assert_trees_all_equal(final_params(run_dir), final_params(uninterrupted[0]))


def test_only_damaged_checkpoints_is_an_error_naming_the_step(tmp_path, prepared, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run_dir)
    for folder in (run_dir / "checkpoints").iterdir():
        (folder / "meta" / "metadata").write_text("{not json")
    with pytest.raises(
        CnnlabError, match="checkpoint step 24 is unreadable: .*checkpoints/24/meta"
    ):
        train(run_dir, prepared)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "checkpoint step 24" in summary["error"]


def test_a_run_directory_of_another_config_is_refused(tmp_path, prepared, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run_dir)
    other = resumable_config(seed=1)
    with pytest.raises(
        ConfigError, match=r"holds the checkpoints of another config \(seed: 0 -> 1\)"
    ):
        run(other, run_dir, Trackers(), prepared=prepared)
    refuse = resumable_config(checkpoint=CheckpointConfig(resume=False))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        run(refuse, run_dir, Trackers(), prepared=prepared)


def test_a_non_finite_state_is_never_saved(tmp_path):
    cfg = resumable_config(
        optimizer=OptimizerConfig(lr=1e30, schedule="constant"),
        checkpoint=CheckpointConfig(every_steps=1, keep=100),
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = run(cfg, run_dir, Trackers(LocalTracker(run_dir)))
    assert summary["status"] == "diverged"
    assert "non-finite at step" in summary["error"]
    saved = checkpoint.Checkpoints(run_dir / "checkpoints", 100, cfg)
    steps = saved.steps()
    assert steps, "nothing was saved before the divergence: the loops below would pass empty"
    bad_step = int(summary["error"].split("at step ")[1].split()[0])
    assert all(step < bad_step for step in steps)
    for step in steps:  # each saved state is finite
        state = saved.manager.restore(step).state
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
    saved.close()


def test_init_from_starts_from_another_runs_weights(tmp_path, prepared, uninterrupted):
    whole = uninterrupted[0]
    cfg = resumable_config(
        train=TrainConfig(epochs=1, batch_size=64, log_every_steps=3),
        checkpoint=CheckpointConfig(init_from=str(whole)),
    )
    run_dir = tmp_path / "fine-tune"
    run_dir.mkdir()
    summary = run(cfg, run_dir, Trackers(LocalTracker(run_dir)))
    assert summary["status"] == "ok" and summary["init_from"] == str(whole)
    first = history(run_dir)[0]["train/loss"]
    assert first < history(whole)[0]["train/loss"] - 0.5  # starts trained, not from scratch


def test_init_from_another_model_names_both_models(tmp_path, uninterrupted):
    """Not orbax's tree-structure message: the model keys of the run that saved the checkpoint
    (its config.yaml) and of this config; without a config.yaml, the first shape that differs."""
    whole = uninterrupted[0]
    cfg = resumable_config(
        model=ModelConfig(padding=[2, 0], depth=8),
        checkpoint=CheckpointConfig(init_from=str(whole)),
    )
    (tmp_path / "other").mkdir()
    with pytest.raises(CnnlabError) as raised:
        run(cfg, tmp_path / "other", Trackers())
    message = str(raised.value)
    assert f"checkpoint.init_from={whole} holds another model than this config's" in message
    assert f"its run ({whole / 'config.yaml'}) trained lenet5 with model.depth=null" in message
    assert "this config asks for lenet5 with model.depth=8, model.dropout=null." in message
    assert "tree structures" not in message and "\n" not in message
    bare = tmp_path / "bare"  # a checkpoint folder alone, no run directory around it
    shutil.copytree(whole / "checkpoint", bare / "weights")
    cfg = dataclasses.replace(cfg, checkpoint=CheckpointConfig(init_from=str(bare / "weights")))
    shape = r"its parameter params/conv1/bias has shape \[6\], this model's \[8\] \(another"
    with pytest.raises(CnnlabError, match=shape):
        run(cfg, tmp_path / "other", Trackers())


def test_a_checkpoint_of_an_earlier_release_still_loads(tmp_path):
    """tests/data/golden/format1 was written by cnnlab 0.1.0 (its README says how): its final
    parameters give the logits recorded then, and its training state resumes."""
    from omegaconf import OmegaConf

    from cnnlab.config import Config
    from cnnlab.models import build_model

    golden = GOLDEN / "format1"
    saved = [p for p in golden.rglob("*") if p.is_file()]
    assert not [p for p in saved if p.read_bytes()[:1] == b"\x80"], "a pickle in a checkpoint"
    schema = OmegaConf.structured(Config)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(golden / "config.yaml")))
    model = build_model(cfg.model, 10)
    like = variables_like(model, (28, 28, 1))["params"]
    params = checkpoint.load_params(golden / "checkpoint", like)
    expected = json.loads((golden / "expected.json").read_text())
    x = np.linspace(-1, 1, 2 * 28 * 28, dtype=np.float32).reshape(2, 28, 28, 1)
    logits = model.apply({"params": params}, x, train=False)
    np.testing.assert_allclose(logits, expected["logits"], rtol=1e-5, atol=1e-6)

    run_dir = tmp_path / "run"
    shutil.copytree(golden, run_dir)
    summary = run(cfg, run_dir, Trackers(LocalTracker(run_dir)))
    assert summary["status"] == "ok" and summary["resumed_from_step"] == 4
    chex.assert_trees_all_equal(final_params(run_dir), params)
    meta = json.loads((golden / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert meta["format"] == 1 and meta["versions"]["cnnlab"] and meta["state_sha256"]


def test_a_checkpoint_of_an_earlier_release_trains_on(tmp_path):
    """The golden training state (step 4, the end of its one epoch) trained on to 3 epochs gives
    the metrics and parameters recorded from it by the loop it was written for: its optimizer
    state (Adam's moments and step count), its loop state in the old JSON layout (each lane's
    record: the best validation accuracy so far) and the per-step keys all carry over."""
    golden = tmp_path / "format1"
    shutil.copytree(GOLDEN / "format1", golden)
    expected = json.loads((GOLDEN / "format1_trained_on.json").read_text())
    cfg = from_dict(yaml.safe_load((golden / "config.yaml").read_text()))
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3))
    prepared = prepare(longer)
    state, train_key = initial_state(prepared, [cfg.seed])
    saved = checkpoint.Checkpoints(golden / "checkpoints", 1, cfg)
    restored = saved.restore(state_tree(state))
    saved.close()
    assert restored.step == 4 and restored.meta["loop"]["lanes"][0]["best_epoch"] == 1
    state = state.replace(**put(restored.state, replicated(prepared.mesh)))
    records = []
    hooks = Hooks([lambda record, step: records.append({**record, "step": step})])
    resume = LoopState.from_json(restored.meta["loop"])
    (result,) = fit(state, prepared, longer.train, Lanes([cfg.seed], train_key), hooks, resume)
    assert int(result.state.step) == expected["steps"] == 12
    assert len(records) == len(expected["records"])
    for got, want in zip(records, expected["records"], strict=True):
        assert got == pytest.approx(want, rel=1e-5), (got, want)
    assert result.record.best_epoch == expected["best_epoch"]
    x = np.linspace(-1, 1, 2 * 28 * 28, dtype=np.float32).reshape(2, 28, 28, 1)
    logits = prepared.model.apply({"params": result.state.params}, x, train=False)
    np.testing.assert_allclose(logits, expected["logits"], rtol=1e-5, atol=1e-6)


def test_batch_norm_statistics_resume_start_fine_tunes_and_predict(tmp_path):
    """A model with batch normalization keeps its running statistics through everything that
    keeps parameters: a resumed run ends bit-identical, both kinds of checkpoint start a
    fine-tune with them, and the final checkpoint predicts what the run's test measured."""
    cfg = resumable_config(model=ModelConfig(padding=[2, 0], dropout=0.2, norm="batch"))
    prepared = prepare(cfg)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train(whole, prepared, cfg)["status"] == "ok"
    assert train(resumed, prepared, cfg, stop=StopAfter(5))["status"] == "preempted"
    summary = train(resumed, prepared, cfg)
    assert summary["status"] == "ok" and summary["resumed_from_step"] == 5
    final = final_params(whole)
    assert set(final) == {"params", "batch_stats"}
    chex.assert_trees_all_equal(final_params(resumed), final)
    assert np.abs(final["batch_stats"]["norm1"]["mean"]).max() > 0.01  # they were updated

    model = prepare(cfg).model
    like = variables_like(model, (28, 28, 1))
    for source in (whole, newest(whole) / "state"):
        loaded = checkpoint.load_init_variables(source, like)
        chex.assert_trees_all_equal(loaded["batch_stats"], final["batch_stats"])

    # the final checkpoint gives the test accuracy the run measured, here and in cnnlab-predict
    from PIL import Image

    from cnnlab.inference import predict_probs
    from experiments.predict import predict

    test = prepared.data.test
    mean, std = prepared.data.mean, prepared.data.std
    probs = predict_probs(model, checkpoint.load_variables(whole / "checkpoint", like),
                          test.images, mean, std)  # fmt: skip
    whole_summary = json.loads((whole / "summary.json").read_text())
    assert np.mean(probs.argmax(-1) == test.labels) == whole_summary["test/accuracy"]
    Image.fromarray(test.images[0][..., 0]).save(tmp_path / "test0.png")
    (ranked,) = predict(whole, [tmp_path / "test0.png"])
    assert ranked[0][1] == pytest.approx(probs[0].max(), abs=1e-5)
