"""runs.py: a run is never clobbered or claimed twice, kill + resume equals an uninterrupted run (1 and 2
ranks), corrupt or changed checkpoints are refused with one line (on every rank), digests are checked once
per run, a full disk keeps the previous checkpoint."""
import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

import runs
from runs import RunError
import model as M
import train as T
from multiproc import free_port, spawn
from train_runs import COMMON, assert_same, run


def test_a_run_is_never_clobbered(tokenizer, tmp_path):
    out = tmp_path / "run"
    argv = COMMON + ["--tokenizer", tokenizer, "--out", str(out), "--steps", "2", "--ckpt-every", "1"]
    T.train(T.parse_args(argv))
    trained = (out / "model.safetensors").read_bytes()
    with pytest.raises(RunError, match="already holds a run; pass --resume .* or --overwrite"):
        T.train(T.parse_args(argv))
    assert (out / "model.safetensors").read_bytes() == trained
    # The same step saved again (a resume with nothing left to do) gets a new name; `latest` names it,
    # and rotation (by step, not by name) keeps it.
    T.train(T.parse_args(argv + ["--resume"]))
    assert (out / "latest").read_text() == "step-000002.1"
    assert [p.name for p in runs.checkpoints(out)] == ["step-000002", "step-000002.1"]
    T.train(T.parse_args(argv + ["--overwrite", "--steps", "1"]))
    assert [p.name for p in runs.checkpoints(out)] == ["step-000001"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_run_directory_in_use_is_refused_and_a_dead_claim_taken_over(tokenizer, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    argv = COMMON + ["--tokenizer", tokenizer, "--out", str(out), "--steps", "1"]
    (out / "lock").write_text(str(os.getppid()))                       # a live process
    with pytest.raises(RunError, match="in use by another run"):
        T.train(T.parse_args(argv))
    dead = mp.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    (out / "lock").write_text(str(dead.pid))
    T.train(T.parse_args(argv))
    assert (out / "model.safetensors").exists() and not (out / "lock").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="is a file"):
        T.train(T.parse_args(COMMON + ["--tokenizer", tokenizer, "--out", str(tmp_path / "file"), "--steps", "1"]))


def test_kill_and_resume_equals_uninterrupted(tokenizer, tmp_path):
    argv = COMMON + ["--steps", "4", "--ckpt-every", "2", "--tokenizer", tokenizer]
    full = run(1, argv, tmp_path, "full")
    out = tmp_path / "killed"
    T.train(T.parse_args(argv + ["--out", str(out), "--stop-after", "2"]))      # "killed" after the step-2 checkpoint
    assert (out / "latest").read_text() == "step-000002"
    resumed = run(1, argv + ["--resume"], tmp_path, "killed")
    assert_same(full, resumed, tol=0)
    # the same checkpoint resumed on two data-parallel ranks continues with the same losses
    out2 = tmp_path / "killed2"
    T.train(T.parse_args(argv + ["--out", str(out2), "--stop-after", "2"]))
    assert_same(full, run(2, argv + ["--resume"], tmp_path, "killed2"))


def test_corrupt_checkpoint_fails_clearly_and_crash_keeps_previous(tokenizer, tmp_path, monkeypatch):
    argv = COMMON + ["--steps", "2", "--ckpt-every", "1", "--tokenizer", tokenizer]
    out = tmp_path / "c"
    T.train(T.parse_args(argv + ["--out", str(out), "--stop-after", "1"]))
    ckpt = out / (out / "latest").read_text()
    shard_file = ckpt / "optim-tp0-dp0.pt"
    good = shard_file.read_bytes()
    shard_file.write_bytes(good[:100])
    with pytest.raises(T.CheckpointError, match=r"optim-tp0-dp0.pt: checksum mismatch"):
        T.train(T.parse_args(argv + ["--out", str(out), "--resume"]))
    shard_file.write_bytes(good)
    # One flipped byte in the weights' data (past the header) is refused by name too.
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-50] ^= 0x40
    weights.write_bytes(bytes(data))
    with pytest.raises(T.CheckpointError, match=r"step-000001/model.safetensors: checksum mismatch"):
        T.train(T.parse_args(argv + ["--out", str(out), "--resume"]))
    # ... and by sample.py's loader (the run's top-level copy carries the tensors' digest in its metadata).
    top = bytearray((out / "model.safetensors").read_bytes())
    top[-50] ^= 0x40
    (tmp_path / "flipped.safetensors").write_bytes(bytes(top))
    with pytest.raises(T.CheckpointError, match="flipped.safetensors: checksum mismatch"):
        T.loading.load_sphinx(tmp_path / "flipped.safetensors")
    # A crash in the middle of writing the next checkpoint leaves `latest` on the previous one.
    out = tmp_path / "d"
    T.train(T.parse_args(argv + ["--out", str(out), "--stop-after", "1"]))
    before = (out / "latest").read_text()
    real_save = torch.save

    def crash(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise KeyboardInterrupt("killed mid-save")
    monkeypatch.setattr(T.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        T.train(T.parse_args(argv + ["--out", str(out), "--resume"]))
    monkeypatch.undo()
    assert (out / "latest").read_text() == before
    res = T.train(T.parse_args(argv + ["--out", str(out), "--resume"]))
    assert len(res["losses"]) == 2


def _resume_worker(rank, world, port, argv, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import runs
    hashed, loading, real_sha, real_load = [], [True], runs.file_sha256, T.load_checkpoint

    def load(*a, **k):                      # record the digests of the resume only, not of the next save's
        try:
            return real_load(*a, **k)
        finally:
            loading[0] = False
    runs.file_sha256 = lambda path: (hashed.append(path.name) if loading[0] else None) or real_sha(path)
    T.load_checkpoint = load
    try:
        T.train(T.parse_args(argv))
        message = "resumed"
    except T.CheckpointError as e:
        message = str(e)
    with open(f"{result_path}.{rank}", "w") as f:
        json.dump({"message": message, "hashed": hashed}, f)
    torch.distributed.destroy_process_group()      # as train.main does: exiting with a live gloo group can abort


def test_digests_are_checked_once_per_run_and_a_bad_file_stops_every_rank(tokenizer, tmp_path):
    """Resuming on 2 ranks: each file's digest is computed by one rank only, and a corrupt file that
    only rank 1 reads stops both ranks with the same line (no rank left waiting in a collective)."""
    out = tmp_path / "r"
    argv = COMMON + ["--steps", "2", "--ckpt-every", "1", "--tokenizer", tokenizer, "--out", str(out)]

    def resume(name):
        spawn(_resume_worker, (2, free_port(), argv + ["--resume"], str(tmp_path / name)), 2, timeout=120)
        return [json.loads((tmp_path / f"{name}.{r}").read_text()) for r in range(2)]
    spawn(_resume_worker, (2, free_port(), argv + ["--stop-after", "1"], str(tmp_path / "first")), 2, timeout=120)
    ckpt = out / (out / "latest").read_text()
    names = sorted(json.loads((ckpt / "state.json").read_text())["sha256"])
    assert names == ["model.safetensors", "optim-tp0-dp0.pt", "optim-tp0-dp1.pt"]
    good = (ckpt / "optim-tp0-dp0.pt").read_bytes()
    (ckpt / "optim-tp0-dp0.pt").write_bytes(good[:100])                        # index 1: rank 1 checks it
    bad = resume("bad")
    assert bad[0]["message"] == bad[1]["message"]
    assert bad[0]["message"].endswith("optim-tp0-dp0.pt: checksum mismatch, the file changed after it was saved")
    (ckpt / "optim-tp0-dp0.pt").write_bytes(good)
    ok = resume("ok")
    assert [r["message"] for r in ok] == ["resumed", "resumed"]
    assert sorted(ok[0]["hashed"] + ok[1]["hashed"]) == names                  # every file once, in all


def test_resume_refuses_changed_settings_and_trims_the_metrics(tokenizer, tmp_path):
    out = tmp_path / "r"
    argv = COMMON + ["--steps", "4", "--ckpt-every", "2", "--tokenizer", tokenizer, "--out", str(out)]
    T.train(T.parse_args(argv + ["--stop-after", "3"]))             # metrics to step 3, checkpoint at 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    with pytest.raises(T.CheckpointError, match=r"other settings than the run's \(--steps 4 -> 5; --lr 0.002 -> 0.001\)"):
        T.train(T.parse_args(argv[:-1] + [str(out), "--steps", "5", "--lr", "1e-3", "--resume"]))
    T.train(T.parse_args(argv + ["--resume"]))
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]                                     # step 3's stale line went with the resume


def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tokenizer, tmp_path, monkeypatch, capsys):
    import errno
    out = tmp_path / "full"
    argv = COMMON + ["--steps", "2", "--ckpt-every", "1", "--tokenizer", tokenizer, "--out", str(out)]

    def no_space(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    real = T.torch.save
    calls = []
    monkeypatch.setattr(T.torch, "save", lambda *a, **k: (calls.append(1), (real if len(calls) == 1 else no_space)(*a, **k))[1])
    with pytest.raises(SystemExit) as e:
        T.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: disk full (") and "optim-tp0-dp0.pt" in err[0]
    assert (out / "latest").read_text() == "step-000001" and not list(out.glob(".tmp-*"))


def test_damaged_metadata_and_state_are_one_line(tokenizer, tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "m.safetensors"), metadata={"format": "sphinx-x"})
    with pytest.raises(T.CheckpointError, match="m.safetensors: its metadata has no 'config'"):
        T.loading.load_sphinx(tmp_path / "m.safetensors")
    out = tmp_path / "s"
    argv = COMMON + ["--steps", "2", "--ckpt-every", "1", "--tokenizer", tokenizer, "--out", str(out)]
    T.train(T.parse_args(argv + ["--stop-after", "1"]))
    state = out / "step-000001" / "state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "rng"}))
    with pytest.raises(T.CheckpointError, match=r"state.json: unreadable or incomplete \(KeyError: 'rng'\)"):
        T.train(T.parse_args(argv + ["--resume"]))


def test_precision_is_chosen_once_and_a_resume_reuses_it(tokenizer, tmp_path, monkeypatch):
    """--dtype auto is recorded in run.json with its reason; a resume with the same command trains on in it
    even when this machine would now decide otherwise (it used to be re-timed and flip under load)."""
    out = tmp_path / "run"
    argv = [a for a in COMMON if a not in ("--dtype", "fp32")] + ["--tokenizer", tokenizer, "--out", str(out), "--steps", "3",
                                                               "--ckpt-every", "1"]
    monkeypatch.setattr(M, "pick_dtype", lambda choice, device: ("bf16", "injected: bf16 instructions"))
    T.train(T.parse_args(argv + ["--stop-after", "1"]))
    assert json.loads((out / "run.json").read_text()) == {"dtype": "bf16", "why": "injected: bf16 instructions",
                                                           "asked": "auto"}
    monkeypatch.setattr(M, "pick_dtype", lambda choice, device: ("fp32", "injected: no bf16"))
    res = T.train(T.parse_args(argv + ["--resume"]))
    assert len(res["losses"]) == 3 and next(res["model"].llm.parameters()).dtype == torch.bfloat16


def test_a_fresh_run_never_appends_to_a_dead_runs_metrics(tokenizer, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 1.0}) + "\n")    # died before a checkpoint
    T.train(T.parse_args(COMMON + ["--tokenizer", tokenizer, "--out", str(out), "--steps", "2"]))
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_ctrl_c_is_one_line_that_says_how_to_resume(tokenizer, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real, calls = T.train_step, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(T, "train_step", interrupted)
    with pytest.raises(SystemExit) as e:
        T.main(COMMON + ["--tokenizer", tokenizer, "--out", str(out), "--steps", "5", "--ckpt-every", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 130 and len(err) == 1
    assert err[0] == f"interrupted; the last good checkpoint is {out / 'step-000002'}, continue it with the same " \
                     "command plus --resume"
    assert not (out / "lock").exists()
