import time, json
from tests.integration.supervisor.harness import tiny_pipeline, metrics_log, incidents
from tests.e2e.test_alert_recovery import _submit

def test_debug(stack, tmp_path):
    state = tmp_path / "state"
    with stack.supervisor(state, watch_enabled=True, prometheus_url=stack.prom_url) as (ctl, client):
        spec = tiny_pipeline(name="dbg", steps=3000, every=10, keep_last=20,
                             faults=[{"kind": "loss_spike", "at_step": 130, "duration": 20}], extra={"step_delay": 0.15})
        rid = _submit(client, spec)
        t0 = time.time()
        stack.wait(lambda: ctl.drivers[rid].active and ctl.drivers[rid].active.last_step > 200, 120, "steps")
        t1 = time.time()
        for e in ['trainguard_train_loss', 'trainguard_spike_score', 'trainguard_anomalies_total{kind="loss_spike"}', 'trainguard_step', 'trainguard_grad_norm',
                  '1.5 * quantile_over_time(0.5, trainguard_train_loss[10m])', 'ALERTS', 'increase(trainguard_anomalies_total{kind="loss_spike"}[2m])']:
            res = stack.query_range(e, t1-40, t1, 1)
            for r in res:
                print(e, r["metric"].get("alertname", ""), r["metric"].get("alertstate", ""), [(round(float(v),2)) for _, v in r["values"]])
        log = metrics_log(state, rid, "pretrain")
        print([(r["step"], round(r["loss"],2), round(r["time"]-t1, 1)) for r in log[125:160]])
        print(stack.tap.posts)
        print([(i.kind, i.onset_step, i.source, i.action, i.outcome) for i in incidents(ctl, rid)])
        print(httpx.get(f"{stack.prom_url}/api/v1/rules").json()["data"]["groups"][0]["rules"][0])
    assert 0
import httpx
