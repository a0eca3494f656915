"""The rollout coordinator's handle on the vLLM engine actors (cluster/vllm_engines.py): which
weights each holds, bringing it to the version the staleness bound asks for, and
generation that survives an engine's death.

    client = EngineClient(engines, sync="shm", weights_dir=..., store=None)
    client.published(3)                      # the trainer has published weights 3
    client.bring_to(0, 3)                    # engine 0 reloads them (shm, store)
    outs = client.generate(0, requests, temperature=1.0, top_p=1.0)

Faults: an engine whose process dies is restarted by Ray (max_restarts=-1) with the
starting weights (version 0). `generate` waits for the restart, re-syncs the engine to
the weights it held and sends the call again (same seeds, same samples); samples that
come back from any other weights version than the one the client expects (a restart
between the check and the call) are discarded and drawn again. On the shm and store
paths the client reloads a restarted engine itself; on the broadcast path only the
training group can (rank 0 broadcasts, every rank gathers under ZeRO-3), so the client
raises EngineNeedsSync and the coordinator asks the trainers for a sync.
"""

from __future__ import annotations

import time
from pathlib import Path

from cluster.worker import say


class EngineNeedsSync(RuntimeError):
    """An engine lost its weights (restarted) on the broadcast path: the training group
    must broadcast them again (rlhf.online.task's feed does, when the coordinator asks)."""

    def __init__(self, index: int, held: int, wanted: int):
        super().__init__(f"engine {index} holds weights {held}, needs {wanted}: it "
                         "restarted, and on the broadcast path only the training group can "
                         "re-sync it")
        self.index = index


def engine_state(engine, attempts: int = 60) -> dict:
    """The engine's `ready()`; a dead one is waited for (Ray restarts it) up to ~30 min.
    An engine whose constructor raised (vLLM could not start) fails at once."""
    import ray

    for attempt in range(attempts):
        try:
            return ray.get(engine.ready.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            if attempt == attempts - 1 or getattr(e, "actor_init_failed", False):
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


def weights_path(weights_dir: str | Path, version: int) -> Path:
    """Where cluster.weight_sync.publish writes version `version` on the shm path."""
    return Path(weights_dir) / f"weights-{version:06d}.safetensors"


def newest_weights(weights_dir: str | Path) -> tuple[int, Path] | None:
    """(version, path) of the newest weights file in `weights_dir`, or None."""
    files = sorted(Path(weights_dir).glob("weights-*.safetensors"))
    if not files:
        return None
    return int(files[-1].stem.split("-")[1]), files[-1]


class EngineClient:
    """Weights versions and calls of the engines, from the coordinator's process."""

    def __init__(self, engines: list, sync: str, weights_dir: str, store=None,
                 attempts: int = 5):
        self.engines, self.sync, self.weights_dir, self.store = engines, sync, weights_dir, store
        self.attempts = attempts
        self.held: list[int | None] = [None] * len(engines)  # None: not known yet
        self.latest = 0  # the newest version the trainers have published
        self.restarts = 0

    def published(self, version: int) -> None:
        self.latest = version

    def forget(self) -> None:
        """After a restore: what each engine holds is asked again (a newer version number
        from before the restore may name other weights)."""
        self.held = [None] * len(self.engines)

    def version(self, i: int) -> int:
        if self.held[i] is None:
            self.held[i] = int(engine_state(self.engines[i])["version"])
        return self.held[i]

    def mark_loaded(self, i: int, version: int) -> None:
        """The trainers broadcast `version` into engine i (broadcast path)."""
        self.held[i] = version

    def bring_to(self, i: int, version: int, exact: bool = False) -> int:
        """Engine i holds `version` or newer afterwards (exact: `version` itself, unless it
        is gone; shm keeps only the newest file and the store the newest version); returns
        the version it holds. An engine that dies meanwhile is waited for and loaded."""
        import ray

        for _ in range(self.attempts):
            held = self.version(i)
            if held == version or (held > version and not exact and held <= self.latest):
                return held
            if self.sync == "broadcast":
                raise EngineNeedsSync(i, held, version)
            try:
                self.held[i] = self._load(i, version)
                return self.held[i]
            except ray.exceptions.RayActorError as e:
                if getattr(e, "actor_init_failed", False):
                    raise
                say(f"engine {i} died while loading weights ({type(e).__name__}); waiting "
                    "for Ray to restart it")
                self.restarts += 1
                self.held[i] = None  # asked again once it is back
        raise RuntimeError(f"engine {i}: could not load weights {version} in "
                           f"{self.attempts} attempts; the engine keeps failing (see its log)")

    def _load(self, i: int, version: int) -> int:
        """One load into engine i: `version` (or the newest, where it is gone)."""
        import ray

        if self.sync == "store":
            ray.get(self.engines[i].load_from_store.remote(self.store, None))
            return int(engine_state(self.engines[i])["version"])
        path = weights_path(self.weights_dir, version)
        target = version
        if not path.is_file():  # replaced by a newer one since
            found = newest_weights(self.weights_dir)
            if found is None:
                raise RuntimeError(f"no weights to load in {self.weights_dir}")
            target, path = found
        ray.get(self.engines[i].load_weights.remote(str(path), target))
        return target

    def generate(self, i: int, requests: list[dict], *, temperature: float, top_p: float
                 ) -> list[list[dict]]:
        """Engine i's samples for `requests` (RolloutEngine.generate_requests), drawn with
        the weights it holds now; see the module docstring for the faults handled."""
        import ray

        want = self.version(i)
        for _ in range(self.attempts):
            try:
                outs = ray.get(self.engines[i].generate_requests.remote(
                    requests, temperature=temperature, top_p=top_p))
            except ray.exceptions.RayActorError as e:
                if getattr(e, "actor_init_failed", False):
                    raise
                say(f"engine {i} died while generating ({type(e).__name__}); waiting for "
                    "Ray to restart it")
                want = self._restarted(i, want)
                continue
            got = {s["version"] for o in outs for s in o}
            if got == {want} or not got:
                return outs
            say(f"engine {i}: samples from weights {sorted(got)}, expected {want}: "
                "drawing again")
            want = self._restarted(i, want)
        raise RuntimeError(f"engine {i}: no samples from weights {want} after "
                           f"{self.attempts} attempts; the engine keeps failing (see its log)")

    def _restarted(self, i: int, want: int) -> int:
        """Engine i came back with its starting weights: wait for it, give it `want` (or
        the newest weights, where `want` is gone); returns the version it holds."""
        self.restarts += 1
        self.held[i] = int(engine_state(self.engines[i])["version"])
        if self.held[i] != want:
            say(f"engine {i} restarted (weights {self.held[i]}, expected {want}): "
                "re-syncing it")
            return self.bring_to(i, want, exact=True)
        return want
