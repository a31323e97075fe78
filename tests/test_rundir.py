"""Epoch checkpoints that fail (docs/design.md §10): a damaged latest epoch is set aside for
the one before it, whatever the damage; errors end as one line, a full disk says where."""

import errno
import os
import re
import shutil

import numpy as np
import pytest

from baim_jax import faults
from baim_jax.framework import rundir

FRESH = {"epoch": 0, "elapsed": 0.0, "curve": []}


def _arrays(step):
    """Random values (incompressible: the data file is the checkpoint's largest)."""
    return [np.random.default_rng(step).random(50_000, np.float32), np.arange(7) + step]


def _two_epochs(path, warnings):
    ckpt = rundir.PhaseCheckpoint(path / "ckpt" / "phase", warn=warnings.append)
    for step in (1, 2):
        ckpt.save(step, _arrays(step),
                  {"epoch": step, "elapsed": float(step), "curve": [0.5] * step})
    ckpt.wait()
    return ckpt


def _largest_file(root):
    return max((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(root):
    f = _largest_file(root)
    os.truncate(f, f.stat().st_size // 3)


def _overwrite(root):
    f = _largest_file(root)
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size // 2)
        fh.write(b"\xff" * 256)


def _remove(root):
    _largest_file(root).unlink()


@pytest.mark.parametrize("damage,why", [
    (_truncate, r"its file state/\S+ has \d+ bytes, \d+ were written"),
    (_overwrite, r"it cannot be restored \(\w+\)|its arrays are not the ones saved"),
    (_remove, r"its file state/\S+ is missing")],
    ids=["truncated", "overwritten bytes", "a missing file"])
def test_a_damaged_latest_epoch_falls_back_to_the_one_before(damage, why, tmp_path):
    """A cut or missing file is found from the epoch's list of files, before orbax reads
    anything; bytes overwritten in place are found by orbax or by the digest."""
    warnings = []
    ckpt = _two_epochs(tmp_path, warnings)
    damage(tmp_path / "ckpt" / "phase" / "2" / "state")
    like = [np.zeros(50_000, np.float32), np.zeros(7, np.int64)]
    leaves, meta = ckpt.latest(like, FRESH)
    assert meta == {"epoch": 1, "elapsed": 1.0, "curve": [0.5]}
    for got, want in zip(leaves, _arrays(1)):
        np.testing.assert_array_equal(got, want)
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("baim-jax: warning: epoch checkpoint ")
    assert warnings[0].endswith("the phase resumes after epoch 1")
    assert re.search(f"phase/2: ({why}); set aside as ", warnings[0]), warnings[0]
    assert (tmp_path / "ckpt" / "set_aside" / "phase-2").is_dir()  # renamed, never deleted
    ckpt.close()


def test_arrays_that_restore_but_were_not_saved_are_set_aside(tmp_path):
    """Epoch 2's state files replaced by epoch 1's (whole, readable, the right shapes) and its
    list of files gone (as when its process was killed before writing it): only the record's
    digest of the saved arrays can tell, and the reason says so."""
    warnings = []
    ckpt = _two_epochs(tmp_path, warnings)
    steps = tmp_path / "ckpt" / "phase"
    shutil.rmtree(steps / "2" / "state")
    shutil.copytree(steps / "1" / "state", steps / "2" / "state")
    (steps / "2" / rundir.PhaseCheckpoint.FILES).unlink()
    like = [np.zeros(50_000, np.float32), np.zeros(7, np.int64)]
    leaves, meta = ckpt.latest(like, FRESH)
    assert meta["epoch"] == 1
    assert len(warnings) == 1
    assert "phase/2: its arrays are not the ones saved; set aside as " in warnings[0]
    ckpt.close()


def test_an_epoch_without_its_list_of_files_restores_as_before(tmp_path):
    warnings = []
    ckpt = _two_epochs(tmp_path, warnings)
    (tmp_path / "ckpt" / "phase" / "2" / rundir.PhaseCheckpoint.FILES).unlink()
    leaves, meta = ckpt.latest([np.zeros(50_000, np.float32), np.zeros(7, np.int64)], FRESH)
    assert meta["epoch"] == 2 and not warnings
    for got, want in zip(leaves, _arrays(2)):
        np.testing.assert_array_equal(got, want)
    ckpt.close()


def test_a_list_of_files_that_cannot_be_written_is_left_out(tmp_path, monkeypatch):
    """A full disk when the lists are written: the epochs stay, without lists, and restore."""
    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(rundir.files, "write_json", full)
    warnings = []
    ckpt = _two_epochs(tmp_path, warnings)
    assert not list((tmp_path / "ckpt" / "phase").rglob(rundir.PhaseCheckpoint.FILES))
    leaves, meta = ckpt.latest([np.zeros(50_000, np.float32), np.zeros(7, np.int64)], FRESH)
    assert meta["epoch"] == 2 and not warnings
    ckpt.close()


def test_an_epoch_of_another_number_of_arrays_says_so(tmp_path):
    """A state of another structure (a run resumed by another version of the model) does not
    restore; the reason gives the counts, not only orbax's error type."""
    warnings = []
    ckpt = _two_epochs(tmp_path, warnings)
    more = [np.zeros(50_000, np.float32), np.zeros(7, np.int64), np.zeros(3, np.int32)]
    assert ckpt.latest(more, FRESH) is None
    assert len(warnings) == 2
    assert all("it holds 2 arrays, this run needs 3" in w for w in warnings)
    ckpt.close()
    fewer = rundir.PhaseCheckpoint(tmp_path / "ckpt2" / "phase", warn=warnings.append)
    fewer.save(1, _arrays(1), {"epoch": 1, "elapsed": 1.0, "curve": [0.5]})
    assert fewer.latest([np.zeros(50_000, np.float32)], FRESH) is None
    assert "it holds 2 arrays, this run needs 1" in warnings[2]
    fewer.close()


def test_no_epoch_left_starts_the_phase_again(tmp_path):
    warnings = []
    ckpt = _two_epochs(tmp_path, warnings)
    for step in ("1", "2"):
        _overwrite(tmp_path / "ckpt" / "phase" / step / "state")
    assert ckpt.latest([np.zeros(50_000, np.float32), np.zeros(7, np.int64)], FRESH) is None
    assert len(warnings) == 2 and all(w.endswith("the phase starts again") for w in warnings)
    ckpt.close()


def test_a_full_disk_is_one_line_naming_the_file():
    enospc = OSError(errno.ENOSPC, "No space left on device", "/data/run/results.json")
    assert faults.no_space_path(enospc) == "/data/run/results.json"
    line = faults.one_line(enospc)
    assert line.startswith("no space left on device writing /data/run/results.json; free ")
    assert "rerun the same command" in line
    # What orbax raises from tensorstore: the path is inside the message.
    orbax = ValueError('RESOURCE_EXHAUSTED: Error writing "3/0.0.0" in OCDBT database at local '
                       'file "/r/ckpt/x/2.tmp/": Failed writing: "/r/ckpt/x/2.tmp/d/ab": Failed '
                       "to write 13561856 bytes to file 4: No space left on device "
                       "[os_error_code='28']")
    assert faults.no_space_path(orbax) == "/r/ckpt/x/2.tmp/d/ab"
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = enospc
    assert faults.no_space_path(wrapped) == "/data/run/results.json"
    assert faults.no_space_path(ValueError("k: must be >= 1")) is None
    assert faults.one_line(ValueError("two\nlines")) == "two lines"


def test_background_tracebacks_are_held_back(capfd):
    import logging
    import threading

    with faults.held_background_errors() as held:
        thread = threading.Thread(target=lambda: 1 / 0)
        thread.start()
        thread.join()
        logging.getLogger("absl").error("a background write failed", exc_info=(
            ValueError, ValueError("disk"), None))
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "ZeroDivisionError" not in err
    assert any("ZeroDivisionError" in h for h in held) and any("disk" in h for h in held)
