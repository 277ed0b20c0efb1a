"""Checkpoints survive crashes, and training resumes from them bit for bit.

A child process saves model A, then starts saving model B and is killed (SIGKILL) at a
chosen moment of `treenn.save`: just after the temporary file is made, after the header,
halfway through an array, before the fsync, before the rename, after it. Other children
save A and B in a loop and are killed after a delay. Afterwards the checkpoint must hold
exactly A or exactly B (byte for byte, and loaded back), never a torn file; a killed
save leaves at most its hidden temporary file, and a later save to the same path works.

Resuming: k steps, save model + optimiser state + step + PRNG key in one file, load them
into fresh objects (and in a fresh process), n more steps: bit-identical to k + n
uninterrupted steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import Net, optax_promotion

import treenn
import treenn.nn as nn

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# -- the models: same structure, different arrays, statuses, modes and pins -------------


class Ckpt(treenn.Module):
    net: Net
    big: nn.Linear  # 512 KiB: the array a save is killed in the middle of

    def __init__(self, seed: int):
        k1, k2 = jax.random.split(jax.random.key(seed))
        self.net = Net(key=k1)
        self.big = nn.Linear(256, 512, key=k2)


def model_a() -> Ckpt:
    return treenn.freeze(Ckpt(1), "net.backbone.**")


def model_b() -> Ckpt:
    return nn.eval_mode(treenn.freeze(Ckpt(2), "big"), pin=True)


# -- the child: dies at a chosen moment of a save -------------------------------------------

CHILD = f"""
import sys
sys.path[:0] = [{str(REPO)!r}, {str(TESTS)!r}]
import treenn  # before conftest: a user's treenn, without the suite's runtime checking
import test_crash_safety
test_crash_safety.child(sys.argv[1:])
"""

# Moments of `treenn.save(path, B)` over a checkpoint of A, and what `path` holds after a
# kill there: the rename is the commit point.
MOMENTS = {
    "temp-file-made": "A",
    "header-written": "A",
    "half-an-array-written": "A",
    "before-fsync": "A",
    "before-rename": "A",
    "after-rename": "B",
}
DELAYS = [0.0, 0.02, 0.1]  # seconds into a loop of saves


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _DyingFile:
    """A file that dies after the header (the 3rd write) or halfway through the first
    large write, as the moment asks."""

    def __init__(self, file: Any, moment: str):
        self.file = file
        self.moment = moment
        self.writes = 0

    def __enter__(self) -> _DyingFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()

    def write(self, data: bytes) -> int:
        self.writes += 1
        if self.moment == "header-written" and self.writes == 3:
            self.file.flush()
            _die()
        if self.moment == "half-an-array-written" and len(data) > 2**18:
            self.file.write(data[: len(data) // 2])
            self.file.flush()
            _die()
        return int(self.file.write(data))

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return int(self.file.fileno())


def _arm(moment: str) -> None:
    """Make the next save die at `moment` (the child is disposable: patch freely)."""
    if moment == "temp-file-made":
        import treenn._safetensors as container

        make = container.temporary_beside
        container.temporary_beside = lambda target: (make(target), _die())[0]
    elif moment in ("header-written", "half-an-array-written"):
        fdopen = os.fdopen
        os.fdopen = lambda fd, mode: _DyingFile(fdopen(fd, mode), moment)  # type: ignore[assignment]
    elif moment == "before-fsync":
        os.fsync = lambda fd: _die()
    elif moment == "before-rename":
        os.replace = lambda src, dst: _die()
    elif moment == "after-rename":
        replace = os.replace
        os.replace = lambda src, dst: (replace(src, dst), _die())[0]


def child(args: list[str]) -> None:
    mode, path = args[0], Path(args[1])
    if mode == "kill-at":
        treenn.save(path, model_a())
        _arm(args[2])
        treenn.save(path, model_b())
        return  # the moment never came: the parent sees exit code 0 and fails
    if mode == "loop":
        a, b = model_a(), model_b()
        treenn.save(path, a)
        print("ready", flush=True)
        while True:
            treenn.save(path, b)
            treenn.save(path, a)
    if mode == "resume":
        resumed = _resume(Path(args[2]), int(args[3]))
        treenn.save(path, resumed)


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- the kills ----------------------------------------------------------------------------


class Killed:
    """A killed child's folder, exit code and error output."""

    def __init__(self, folder: Path, returncode: int, stderr: str):
        self.folder = folder
        self.path = folder / "model.safetensors"
        self.returncode = returncode
        self.stderr = stderr


@pytest.fixture(scope="module")
def kills(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Killed]:
    """Every child started at once (they spend most of their time importing JAX)."""
    folders = {name: tmp_path_factory.mktemp(name) for name in [*MOMENTS, *map(str, DELAYS)]}
    procs = {m: _spawn("kill-at", str(folders[m] / "model.safetensors"), m) for m in MOMENTS}
    loops = {str(d): _spawn("loop", str(folders[str(d)] / "model.safetensors")) for d in DELAYS}
    try:
        for delay, proc in zip(DELAYS, loops.values()):
            assert proc.stdout is not None
            ready = proc.stdout.readline()
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            assert ready == "ready\n", proc.communicate()[1]
        results = {}
        for name, proc in {**procs, **loops}.items():
            _, stderr = proc.communicate(timeout=300)
            results[name] = Killed(folders[name], proc.returncode, stderr)
        return results
    finally:
        for proc in [*procs.values(), *loops.values()]:
            if proc.poll() is None:  # a loop never ends by itself
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The bytes of A's and B's checkpoints, written by this process."""
    folder = tmp_path_factory.mktemp("reference")
    out = {}
    for name, make in (("A", model_a), ("B", model_b)):
        treenn.save(folder / name, make())
        out[name] = (folder / name).read_bytes()
    assert out["A"] != out["B"]
    return out


def assert_identical(a: Any, b: Any) -> None:
    """Same structure (marks, modes, pins), same bits."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()
    assert nn.modes(a) == nn.modes(b) and nn.pinned(a) == nn.pinned(b)


def _strays(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "model.safetensors")


def _check_later_save(killed: Killed) -> None:
    """Leftovers of the killed save do not get in the way of the next one."""
    treenn.save(killed.path, model_b())
    assert_identical(treenn.load(killed.path, Ckpt(0)), model_b())


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_kill_during_save_leaves_old_or_new_checkpoint(
    kills: dict[str, Killed], saved: dict[str, bytes], moment: str
) -> None:
    killed = kills[moment]
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # died at the moment
    expected = MOMENTS[moment]
    assert killed.path.read_bytes() == saved[expected]
    assert_identical(treenn.load(killed.path, Ckpt(0)), {"A": model_a, "B": model_b}[expected]())
    # Killed before the rename, the temporary file stays behind (hidden, never read).
    strays = _strays(killed.folder)
    if expected == "A":
        assert len(strays) == 1, strays
        assert strays[0].startswith(".model.safetensors.") and strays[0].endswith(".tmp")
    else:
        assert strays == []
    _check_later_save(killed)


@pytest.mark.slow
@pytest.mark.parametrize("delay", DELAYS)
def test_kill_at_random_moments_of_repeated_saves(
    kills: dict[str, Killed], saved: dict[str, bytes], delay: float
) -> None:
    killed = kills[str(delay)]
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    data = killed.path.read_bytes()
    assert data in (saved["A"], saved["B"])
    loaded = treenn.load(killed.path, Ckpt(0))
    assert_identical(loaded, model_a() if data == saved["A"] else model_b())
    assert all(s.startswith(".model.safetensors.") for s in _strays(killed.folder))
    _check_later_save(killed)


# -- resuming -------------------------------------------------------------------------------

K, N = 3, 3  # steps before and after the checkpoint
TX = optax.adamw(optax.cosine_decay_schedule(0.05, K + N), weight_decay=1e-2)


def fresh_model(seed: int) -> Net:
    """A model as the training script makes it, before training or loading."""
    return treenn.freeze(Net(key=jax.random.key(seed)), "backbone.layers.0")


def fresh_state(seed: int) -> dict[str, Any]:
    """Everything a resumed run needs, in one pytree saved in one (atomic) file."""
    model = fresh_model(seed)
    with optax_promotion():
        opt_state = TX.init(treenn.trainable(model))
    return {
        "model": model,
        "opt_state": opt_state,
        "step": jnp.int32(0),
        "key": jax.random.key(seed),
    }


def _batch(i: int) -> tuple[jax.Array, jax.Array]:
    k = jax.random.fold_in(jax.random.key(99), i)
    return jax.random.normal(k, (6, 5, 5, 3)), jax.random.randint(k, (6,), 0, 3)


def _loss(model: Net, x: jax.Array, y: jax.Array, key: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x, key=key), y).mean()


_STEP = treenn.train_step(_loss, TX)


def train(state: dict[str, Any], steps: int) -> tuple[dict[str, Any], list[jax.Array]]:
    """`steps` training steps from `state`; the dropout key of step i is derived from the
    saved key and i, so a resumed run draws the same masks."""
    model, opt_state, start = state["model"], state["opt_state"], int(state["step"])
    losses = []
    with optax_promotion():
        for i in range(start, start + steps):
            x, y = _batch(i)
            key = jax.random.fold_in(state["key"], i)
            model, opt_state, loss = _STEP(model, opt_state, x, y, key)
            losses.append(loss)
    return {
        **state,
        "model": model,
        "opt_state": opt_state,
        "step": jnp.int32(start + steps),
    }, losses


def _resume(path: Path, seed: int) -> dict[str, Any]:
    """Load a checkpoint into fresh objects (another seed: nothing comes from them but
    the structure) and train the remaining steps."""
    state = treenn.load(path, fresh_state(seed))
    return train(state, N)[0]


def _bits(tree: Any) -> Iterator[tuple[str, bytes]]:
    for leaf in jax.tree.leaves(tree):
        if not hasattr(leaf, "dtype"):  # a Python scalar (a module's `inference` flag)
            yield type(leaf).__name__, repr(leaf).encode()
            continue
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        array = np.asarray(leaf)
        yield str(array.dtype), array.tobytes()


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert list(_bits(a)) == list(_bits(b))
    assert nn.modes(a["model"]) == nn.modes(b["model"])
    assert treenn.summary(a["model"]) == treenn.summary(b["model"])  # statuses too


@pytest.fixture(scope="module")
def uninterrupted() -> tuple[dict[str, Any], list[jax.Array]]:
    return train(fresh_state(0), K + N)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "state.safetensors"
    treenn.save(path, train(fresh_state(0), K)[0])
    return path


def test_resume_in_fresh_objects_is_bit_identical(
    uninterrupted: tuple[dict[str, Any], list[jax.Array]], checkpoint: Path
) -> None:
    reference, losses = uninterrupted
    state = treenn.load(checkpoint, fresh_state(7))
    assert int(state["step"]) == K and int(state["opt_state"][0].count) == K
    resumed, resumed_losses = train(state, N)
    assert_same_state(resumed, reference)
    assert [np.asarray(x).tobytes() for x in resumed_losses] == [
        np.asarray(x).tobytes() for x in losses[K:]
    ]
    # The run moved: the comparison is not between untouched states.
    assert list(_bits(resumed["model"])) != list(_bits(fresh_state(0)["model"]))


@pytest.mark.slow
def test_resume_in_a_fresh_process_is_bit_identical(
    uninterrupted: tuple[dict[str, Any], list[jax.Array]], checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "resumed.safetensors"
    proc = _spawn("resume", str(out), str(checkpoint), "5")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert_same_state(treenn.load(out, fresh_state(3)), uninterrupted[0])


def test_optimizer_state_of_another_trainable_set_names_the_paths(checkpoint: Path) -> None:
    """The checkpoint's optimiser state fits only a model frozen the same way."""
    like = fresh_state(0)
    like["model"] = treenn.unfreeze(like["model"])
    with optax_promotion():
        like["opt_state"] = TX.init(treenn.trainable(like["model"]))
    with pytest.raises(
        treenn.CheckpointError,
        match=r"missing from the file: 'opt_state\.0\.mu\.backbone\.layers\.0\.bias'",
    ):
        treenn.load(checkpoint, like)
