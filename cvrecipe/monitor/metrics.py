"""Prometheus gauges of monitoring, registered in the server's own registry beside its metrics."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from cvrecipe.monitor.drift import STATES

STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)  # s


class MonitorMetrics:
    def __init__(self, registry):
        r = registry
        self.stage = Histogram("cvrecipe_stage_seconds", "time per stage: decode (decode + resize, per batch), infer "
                               "(forward pass, per batch), log (window + prediction log write, per request), respond (the answer "
                               "serialised and handed to the server, per request)",
                               ["stage"], buckets=STAGE_BUCKETS, registry=r)
        # each stage's child, looked up once: labels() takes a lock and a dict lookup per call
        self.stages = {name: self.stage.labels(name) for name in ("decode", "infer", "log", "respond")}
        self.drift_score = Gauge("cvrecipe_drift_score", "drift statistic of the window against the reference "
                                 "(psi, ks statistic or mmd2)", ["quantity", "statistic"], registry=r)
        self.drift_p = Gauge("cvrecipe_drift_p_value", "p-value of the KS tests", ["quantity"], registry=r)
        self.drift_state = Gauge("cvrecipe_drift_state", "-1 waiting, 0 ok, 1 warn, 2 alert (quantity=overall: "
                                 "the worst)", ["quantity"], registry=r)
        self.window = Gauge("cvrecipe_window_predictions", "predictions in the monitoring window", registry=r)
        self.class_share = Gauge("cvrecipe_class_share", "share of predicted classes, live window and reference",
                                 ["class_name", "sample"], registry=r)
        self.confidence = Gauge("cvrecipe_confidence_mean", "mean confidence (max probability) in the window",
                                registry=r)
        self.accuracy = Gauge("cvrecipe_live_accuracy", "accuracy over labelled predictions in the window (NaN: none)",
                              registry=r)
        self.ece = Gauge("cvrecipe_live_ece", "expected calibration error over labelled predictions", registry=r)
        self.recall = Gauge("cvrecipe_live_recall", "recall per true class over labelled predictions",
                            ["class_name"], registry=r)
        self.labelled = Gauge("cvrecipe_window_labelled", "labelled predictions in the window", registry=r)
        self.feedback = Counter("cvrecipe_feedback_total", "feedback labels accepted", registry=r)
        self.alerts = Counter("cvrecipe_alerts_total", "webhook alerts by result", ["result"], registry=r)
        self.cpu = Gauge("cvrecipe_process_cpu_percent", "process CPU use over the last interval (100 = one core)",
                         registry=r)
        self.rss = Gauge("cvrecipe_process_resident_bytes", "process resident memory", registry=r)
        self.threads = Gauge("cvrecipe_process_threads", "process threads", registry=r)
        self.gpu_memory = Gauge("cvrecipe_gpu_memory_bytes", "GPU memory allocated by torch (0 without a GPU)",
                                registry=r)
        self.log_rows = Gauge("cvrecipe_log_rows_written", "prediction log rows committed since start", registry=r)
        self.log_pending = Gauge("cvrecipe_log_pending", "writes waiting for the prediction log thread", registry=r)

    def update(self, report: dict) -> None:
        for d in report["drift"]:
            self.drift_state.labels(d["quantity"]).set(STATES.index(d["state"]) - 1)
            if d["score"] is not None:
                self.drift_score.labels(d["quantity"], d["statistic"]).set(d["score"])
            if "p_value" in d:
                self.drift_p.labels(d["quantity"]).set(d["p_value"])
        self.drift_state.labels("overall").set(STATES.index(report["state"]) - 1)
        self.window.set(report["window"]["predictions"])
        names = report["classes"]
        for sample in ("live", "reference"):
            shares = report["class_mix"][sample]
            for name, share in zip(names, shares or []):
                self.class_share.labels(name, sample).set(share)
        self.confidence.set(_nan(report["confidence"]["mean"]))
        acc = report["accuracy"]
        self.accuracy.set(_nan(acc["accuracy"]))
        self.ece.set(_nan(acc["ece"]))
        self.labelled.set(acc["labelled"])
        for name, recall in acc["per_class_recall"].items():
            self.recall.labels(name).set(recall)
        res = report["resources"]
        self.cpu.set(res["cpu_percent"])
        self.rss.set(res["rss_bytes"])
        self.threads.set(res["threads"])
        self.gpu_memory.set(res["gpu_memory_bytes"] or 0)
        if report["log"]:
            self.log_rows.set(report["log"]["rows_written"])
            self.log_pending.set(report["log"]["pending"])


def _nan(value):
    return float("nan") if value is None else value
