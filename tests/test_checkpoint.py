"""Checkpoints: round trip, keep-last, atomicity under a crash, clear errors for damaged files."""
import pytest
import torch

from nrdm import checkpoint as ckpt_mod
from nrdm.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def save(run, step, value=1.0, keep=2, keep_every=0):
    state = {"w": torch.full((3, 2), value)}
    return save_checkpoint(run, step, state, {"w": state["w"] * 2}, {"step": step, "optimizer": {"lr": 0.1}},
                           "train:\n  steps: 9\n", keep_last=keep, keep_every=keep_every)


def test_round_trip_and_keep_last(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, value=float(step))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    loaded = load_checkpoint(latest_checkpoint(tmp_path))
    assert torch.equal(loaded["model"]["w"], torch.full((3, 2), 3.0))
    assert torch.equal(loaded["ema"]["w"], torch.full((3, 2), 6.0))
    assert loaded["state"]["step"] == 3 and "steps: 9" in loaded["config_yaml"]


def test_keep_every_keeps_the_multiples_besides_the_last(tmp_path):
    for step in range(1, 11):
        save(tmp_path, step, keep=2, keep_every=4)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000008", "step-00000009",
                                                            "step-00000010"]


def test_a_checkpoint_is_found_by_step_or_path(tmp_path):
    for step in (3, 6):
        save(tmp_path, step)
    assert ckpt_mod.find_checkpoint(tmp_path).name == "step-00000006"
    assert ckpt_mod.find_checkpoint(tmp_path, "step-3").name == ckpt_mod.find_checkpoint(tmp_path, "3").name == "step-00000003"
    assert ckpt_mod.find_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "step-00000006")).name == "step-00000006"
    with pytest.raises(ValueError, match=r"no checkpoint 'step-4' in .* \(it has: step-00000003, step-00000006\)"):
        ckpt_mod.find_checkpoint(tmp_path, "step-4")


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1)
    calls = {"n": 0}
    real_save = ckpt_mod.save_file

    def failing_save(tensors, filename):
        calls["n"] += 1
        if calls["n"] == 2:                 # the EMA file of the second checkpoint
            real_save(tensors, filename)
            with open(filename, "r+b") as f:
                f.truncate(10)
            raise OSError("disk full")
        real_save(tensors, filename)

    monkeypatch.setattr(ckpt_mod, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["state"]["step"] == 1
    monkeypatch.setattr(ckpt_mod, "save_file", real_save)
    save(tmp_path, 2)                       # the next save clears the leftover temp directory
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] and latest_checkpoint(tmp_path).name == "step-00000002"
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


@pytest.mark.parametrize("victim", ["model.safetensors", "ema.safetensors", "state.pt"])
def test_truncated_or_corrupt_files_give_clear_errors(tmp_path, victim):
    path = save(tmp_path, 1)
    data = (path / victim).read_bytes()
    (path / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{victim} is corrupt or truncated.*delete the checkpoint directory"):
        load_checkpoint(path)
    (path / victim).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_incomplete_checkpoint(tmp_path):
    path = save(tmp_path, 1)
    (path / "state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete \(missing state.pt\)"):
        load_checkpoint(path)


def test_model_args_round_trip_and_a_corrupt_file_is_explained(tmp_path):
    state = {"w": torch.zeros(2)}
    path = save_checkpoint(tmp_path, 1, state, state, {"step": 1}, "train: {}\n", model_args={"size": None, "width": 8})
    assert load_checkpoint(path)["model_args"] == {"size": None, "width": 8}
    assert load_checkpoint(save(tmp_path, 2))["model_args"] is None          # saved without them (older runs)
    (path / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.json is corrupt"):
        load_checkpoint(path)
