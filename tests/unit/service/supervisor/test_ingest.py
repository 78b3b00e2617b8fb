"""The watch's ingest: buffers per rank, rank 0's steps, and GPU error counters that count from
their worker's start (a rise the first scrape already shows is still found)."""
from __future__ import annotations

from trainguard.service.adapters.metrics import Snapshot, Target
from trainguard.service.domain.evaluate import WatchConfig, evaluate_stage
from trainguard.service.supervisor.stage import ActiveStage
from trainguard.service.supervisor.ingest import Watch

from tests.unit.service.supervisor.fakes import steps

T0 = Target(run="r", stage="pretrain", rank=0, host="fake", port=1)


def _watch_and_stage() -> tuple[Watch, ActiveStage]:
    # ingest touches the store only for the stage row's first loss: a stand-in ledger records it
    class _Ledger:
        def update_stage(self, *a, **kw) -> None:
            pass

    watch = Watch(_Ledger(), executor=None, source=None, config=WatchConfig(), running=lambda: [])  # type: ignore[arg-type]
    active = ActiveStage(run_id="r", name="pretrain", kind="pretrain", index=0, steps=100, targets=[T0])
    return watch, active


def test_a_gpu_error_the_first_scrape_already_counts_is_a_fault_since_the_group_started():
    watch, active = _watch_and_stage()
    watch.ingest(active, {T0: Snapshot(reachable=True, records=steps(31, 40), step=40, counters={"gpu_xid": 1.0})})
    (f,) = [f for f in evaluate_stage(active, WatchConfig(), now=0.0) if f.kind == "gpu_fault"]
    assert (f.onset_step, f.detected_at_step) == (31, 40)  # somewhere since the group's first step


def test_a_gpu_counter_that_stays_at_zero_is_no_fault_and_a_later_rise_is_dated_by_the_scrapes():
    watch, active = _watch_and_stage()
    watch.ingest(active, {T0: Snapshot(reachable=True, records=steps(1, 10), step=10, counters={"gpu_xid": 0.0})})
    assert not [f for f in evaluate_stage(active, WatchConfig(), now=0.0) if f.kind == "gpu_fault"]
    watch.ingest(active, {T0: Snapshot(reachable=True, records=steps(11, 20), step=20, counters={"gpu_xid": 1.0})})
    (f,) = [f for f in evaluate_stage(active, WatchConfig(), now=0.0) if f.kind == "gpu_fault"]
    assert (f.onset_step, f.detected_at_step) == (11, 20)
    assert active.last_step == 20 and len(active.records[0]) == 20


def test_two_watch_cycles_never_fetch_at_once():
    """The scheduler's cycle and a driver's (its group finished) run on different threads; a
    source's history cursor must not hand the same records to both (a replayed step read as a
    rollback that took effect)."""
    import threading
    import time

    class _SlowSource:
        def __init__(self) -> None:
            self.inside = self.most = 0
            self.lock = threading.Lock()

        def fetch(self, targets):
            with self.lock:
                self.inside += 1
                self.most = max(self.most, self.inside)
            time.sleep(0.2)
            with self.lock:
                self.inside -= 1
            return {}

    class _Ledger:  # what a cycle with nothing fetched touches: the run's lock and the live row
        def lock(self, run_id: str) -> threading.RLock:
            return threading.RLock()

        def __getattr__(self, name: str):
            return lambda *a, **kw: None

    watch, active = _watch_and_stage()
    watch.ledger, watch.detect = _Ledger(), False
    watch.source = source = _SlowSource()
    watch.running = lambda: [("r", active)]
    threads = [threading.Thread(target=watch.once) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert source.most == 1
