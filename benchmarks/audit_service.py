"""The 50-model audit as a user runs it: through the command line and through the real service,
against one `cgidm check` per model; models/hour per tier, the members' ranks, the realised FDR,
and whether the service decided exactly as the command line.

    python -m benchmarks.audit_service --cli --checks 2 --service   # all three, then the table
    python -m benchmarks.audit_service --service --workers 2        # only the service run
    python -m benchmarks.audit_service                              # the table of what was run

The set is :mod:`benchmarks.audit_set`'s (build it first: ``python -m benchmarks.audit_set``).
Portfolio: the ten Van Gogh split A members; controls: the ten hold-outs; ``--steps`` PGD steps
of the full verdict (25 by default, as docs/AUDITS.md measured; the method's default is 100).

- ``--cli``: ``cgidm audit --images ... --controls ... --models models.json --out OUT/cli``,
  one new process, the models named by their cached paths.
- ``--checks N``: ``cgidm check`` once on each of N models (a non-member LoRA, then member
  LoRAs), each in a new process, as a user checking model by model would run it.
- ``--service``: an operator registry file (``CGIDM_MODELS``) naming ``demo-base`` and the 50
  models by their cached paths; the real stack on loopback (redis-server, the moto S3 server,
  ``--workers`` Celery workers, the gateway under uvicorn: ``cgidm_testkit.routing_stack``, the
  stack the routing tests run); the audit submitted with ``cgidm submit-audit`` by registry id,
  followed model by model, its ranked result downloaded to ``OUT/service``.

Every run writes its output, log and ``timing.json`` (wall seconds, load averages sampled during
the run) under ``OUT`` (``~/.cache/cgidm/audit50-runs/<steps>steps``), so the table can be
printed again without re-running. Children run with one torch thread each (OMP_NUM_THREADS=1)
and inherit this process's niceness: run it under ``nice -n 5`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.audit_set import CACHE, CONTROLS, PORTFOLIO, SetModel, audit_set, reference

BASE_ID = "demo-base"
DEFAULT_OUT = CACHE.parent / "audit50-runs"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1"}


# ------------------------------------------------------------------------------------------
# inputs


def cli_model_list(models: Sequence[SetModel]) -> list[dict[str, str]]:
    """`cgidm audit --models`: the suspects by their cached paths."""
    return [{"pretrained": BASE_ID, "finetuned": str(reference(m))} for m in models]


def service_registry(models: Sequence[SetModel]) -> dict[str, Any]:
    """The operator's registry file: demo-base (the packaged demo, by its demo name) and each
    model of the set under its label, by its cached path; LoRAs as ``kind: lora`` of demo-base,
    so a worker swaps them on its loaded base."""
    entries: list[dict[str, Any]] = [{"id": BASE_ID, "family": "ddpm", "path": BASE_ID}]
    for m in models:
        entries.append({"id": m.label, "family": "ddpm", "path": str(reference(m)),
                        "finetuned_from": BASE_ID,
                        **({"kind": "lora"} if m.kind == "lora" else {}),
                        "description": f"audit set: {'member' if m.member else 'non-member'} "
                                       f"{m.kind}"})
    return {"models": entries}


def service_model_list(models: Sequence[SetModel]) -> list[dict[str, str]]:
    """`cgidm submit-audit --models`: the suspects by registry id, as a service user names them."""
    return [{"pretrained": BASE_ID, "finetuned": m.label} for m in models]


# ------------------------------------------------------------------------------------------
# running


class LoadSampler:
    """The 1-minute load average every ``interval`` seconds while a run lasts: the machine is
    shared, and a wall time means little without the load it was measured under."""

    def __init__(self, interval: float = 15.0):
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        values = self.samples or [os.getloadavg()[0]]
        return {"min": min(values), "mean": round(sum(values) / len(values), 2),
                "max": max(values), "samples": len(values)}


def _cgidm() -> str:
    return str(Path(sys.executable).parent / "cgidm")


def _run_logged(command: list[str], log: Path, env: Mapping[str, str] | None = None
                ) -> tuple[int, float, dict[str, float]]:
    """Run ``command`` with its output in ``log``; (exit status, wall seconds, load summary)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle, LoadSampler() as load:
        t0 = time.perf_counter()
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT,
                              env={**os.environ, **ONE_THREAD, **(env or {})}).returncode
        seconds = time.perf_counter() - t0
    return code, seconds, load.summary()


def _write_timing(folder: Path, **facts: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "timing.json").write_text(json.dumps(facts, indent=1) + "\n")


def run_cli(models: Sequence[SetModel], out: Path, steps: int) -> None:
    folder = out / "cli"
    folder.mkdir(parents=True, exist_ok=True)
    (out / "models.json").write_text(json.dumps(cli_model_list(models), indent=1) + "\n")
    command = [_cgidm(), "audit", "--images", str(PORTFOLIO), "--controls", str(CONTROLS),
               "--models", str(out / "models.json"), "--steps", str(steps), "--out", str(folder)]
    print(f"cgidm audit: {len(models)} models ...", flush=True)
    code, seconds, load = _run_logged(command, folder / "run.log")
    _write_timing(folder, seconds=round(seconds, 1), exit_status=code, load=load,
                  command=command)
    print(f"cgidm audit: exit {code} in {seconds:.0f} s (load {load['mean']})", flush=True)


def check_picks(models: Sequence[SetModel], count: int) -> list[SetModel]:
    """The models `cgidm check` is timed on: a non-member LoRA (docs/AUDITS.md timed the
    backpack rank-8 LoRA), then member LoRAs."""
    loras = [m for m in models if m.kind == "lora"]
    others = [m for m in loras if not m.member]
    first = [next((m for m in others if m.label == "backpack-lora-r8"), others[0])] \
        if others else []  # a partial set (--built) may have no non-member LoRA yet
    return (first + [m for m in loras if m.member])[:count]


def run_checks(models: Sequence[SetModel], out: Path, steps: int, count: int) -> None:
    runs = []
    for m in check_picks(models, count):
        folder = out / "checks" / m.label
        command = [_cgidm(), "check", "--pretrained", BASE_ID, "--finetuned",
                   str(reference(m)), "--controls", str(CONTROLS), "--steps", str(steps),
                   "--out", str(folder / "out"), str(PORTFOLIO)]
        code, seconds, load = _run_logged(command, folder / "run.log")
        runs.append({"model": m.label, "member": m.member, "seconds": round(seconds, 1),
                     "exit_status": code, "load": load})
        print(f"cgidm check {m.label}: exit {code} in {seconds:.0f} s (load {load['mean']})",
              flush=True)
    (out / "checks").mkdir(parents=True, exist_ok=True)
    (out / "checks" / "timing.json").write_text(json.dumps(runs, indent=1) + "\n")


@contextmanager
def service_stack(root: Path, registry: Path, workers: int) -> Iterator[str]:
    """The real stack on loopback, as the service tests start it; yields the gateway's URL."""
    from cgidm_testkit.processes import start_moto, start_redis, stop_process
    from cgidm_testkit.routing_stack import routing_stack

    redis_proc, redis_url = start_redis(root)
    try:
        moto_proc, s3 = start_moto(root)
        try:
            # shared routing: any free worker takes the next group, so the groups of the one
            # base fan out over the workers (each keeps the base loaded for its own groups)
            with routing_stack(root, name="audit50", routing="shared", redis_url=redis_url,
                               s3_endpoint=s3, registry=registry, workers=workers,
                               cache_bytes=2 * 1024**3,
                               extra_env={**ONE_THREAD, "CGIDM_PROGRESS_INTERVAL": "1",
                                          "CGIDM_CANCEL_CHECK_INTERVAL": "1"}) as stack:
                yield str(stack.client.base_url)
        finally:
            stop_process(moto_proc)
    finally:
        stop_process(redis_proc)


def run_service(models: Sequence[SetModel], out: Path, steps: int, workers: int) -> None:
    folder = out / "service"
    folder.mkdir(parents=True, exist_ok=True)
    registry = folder / "registry.json"
    registry.write_text(json.dumps(service_registry(models), indent=1) + "\n")
    model_list = folder / "models.json"
    model_list.write_text(json.dumps(service_model_list(models), indent=1) + "\n")
    root = Path(tempfile.mkdtemp(prefix="cgidm-audit50-"))
    print(f"service: starting redis, moto, {workers} worker(s), the gateway in {root}",
          flush=True)
    t_start = time.perf_counter()
    with service_stack(root, registry, workers) as url:
        started = time.perf_counter() - t_start
        command = [_cgidm(), "submit-audit", "--server", url, "--images", str(PORTFOLIO),
                   "--controls", str(CONTROLS), "--models", str(model_list), "--steps",
                   str(steps), "--out", str(folder / "out"), "--timeout", "7200"]
        print(f"service up in {started:.0f} s at {url}; cgidm submit-audit ...", flush=True)
        code, seconds, load = _run_logged(command, folder / "run.log")
    for log in root.glob("*.log"):  # the workers' and gateway's logs, kept with the output
        (folder / log.name).write_text(log.read_text(errors="replace"))
    _write_timing(folder, seconds=round(seconds, 1), exit_status=code, load=load,
                  workers=workers, stack_start_seconds=round(started, 1), command=command)
    print(f"service audit: exit {code} in {seconds:.0f} s (load {load['mean']})", flush=True)


# ------------------------------------------------------------------------------------------
# the table


def read_audit(path: Path) -> dict[str, Any]:
    """The ranked audit document: `cgidm audit` writes it as is, `cgidm submit-audit` saves
    the service's whole audit, whose ``result`` it is."""
    document = json.loads(path.read_text())
    return document.get("result", document)


def tier_rates(document: Mapping[str, Any], wall: float, workers: int = 1) -> dict[str, Any]:
    """Seconds per model of each tier from the per-model times the audit records (the screen's
    ``screen_seconds``; a full verdict's inversion, ``seconds - screen_seconds``), and the wall
    rate of the whole audit; ``other_seconds`` is the worker time outside any model's own time
    (process start, imports, loading the images and the bases, writing the result; in the
    service also the queue, storage round trips and a worker's idle wait): ``workers`` x wall
    minus the models' summed times, since with several workers those overlap in wall time."""
    models = [m for m in document["models"] if m.get("tier") != "error"]
    full = [m for m in models if m.get("tier") == "full"]
    screen = sum(float(m["screen_seconds"]) for m in models)
    inversion = sum(float(m["seconds"]) - float(m["screen_seconds"]) for m in full)
    return {"models": len(models), "full_models": len(full),
            "screen_s_per_model": screen / max(1, len(models)),
            "full_s_per_model": inversion / max(1, len(full)),
            "model_seconds": screen + inversion, "wall": wall,
            "workers": workers, "other_seconds": workers * wall - screen - inversion,
            "wall_s_per_model": wall / max(1, len(models))}


def outcome(document: Mapping[str, Any], label_of: Mapping[str, str],
            member: Mapping[str, bool]) -> dict[str, Any]:
    """The decisions of one audit, by model label: rank, tier, p, q, screen p, flagged; the
    members' ranks, the flags, the false hits and the realised FDR (false hits / hits)."""
    rows = {}
    for m in document["models"]:
        label = label_of.get(m["finetuned"], m["finetuned"])
        rows[label] = {k: m.get(k) for k in ("rank", "tier", "p_value", "q_value",
                                             "screen_p_value", "flagged")}
    flagged = [label for label, r in rows.items() if r["flagged"]]
    false_hits = [label for label in flagged if not member.get(label, False)]
    members = sorted((r["rank"] or 10**6, label) for label, r in rows.items()
                     if member.get(label, False))
    return {"rows": rows, "member_ranks": [rank for rank, _ in members],
            "flagged": flagged, "false_hits": false_hits,
            "fdr": len(false_hits) / len(flagged) if flagged else 0.0,
            "members_missed": [label for _, label in members if label not in flagged],
            "errors": [label for label, r in rows.items() if r["tier"] == "error"]}


def differences(first: Mapping[str, Any], second: Mapping[str, Any], *,
                rel_tol: float = 1e-6) -> list[str]:
    """Where two audits of the same set decided differently, model by model: another rank,
    tier or flag, or a p-, q- or screen p-value that differs by more than ``rel_tol``
    (relative). Empty when they agree."""
    import math

    out = []
    a, b = first["rows"], second["rows"]
    for label in sorted(set(a) | set(b)):
        if label not in a or label not in b:
            out.append(f"{label}: only in {'the first' if label in a else 'the second'}")
            continue
        for key in ("rank", "tier", "flagged"):
            if a[label][key] != b[label][key]:
                out.append(f"{label}: {key} {a[label][key]} vs {b[label][key]}")
        for key in ("p_value", "q_value", "screen_p_value"):
            x, y = a[label][key], b[label][key]
            if (x is None) != (y is None) or (x is not None and not math.isclose(
                    float(x), float(y), rel_tol=rel_tol, abs_tol=0.0)):
                out.append(f"{label}: {key} {x} vs {y}")
    return out


def _rate(seconds: float) -> str:
    return f"{3600 / seconds:>7.0f}" if seconds > 0 else f"{'-':>7}"


def report(out: Path) -> None:
    models = audit_set()  # the whole set: a run may have audited part of it (--built)
    member = {m.label: m.member for m in models}
    label_of = {str(reference(m)): m.label for m in models} | {m.label: m.label for m in models}
    runs: dict[str, dict[str, Any]] = {}
    for name in ("cli", "service"):
        folder = out / name
        path = folder / ("audit.json" if name == "cli" else "out/audit.json")
        if not path.is_file() or not (folder / "timing.json").is_file():
            continue
        timing = json.loads((folder / "timing.json").read_text())
        document = read_audit(path)
        runs[name] = {"timing": timing, "rates": tier_rates(document, timing["seconds"],
                                                            int(timing.get("workers") or 1)),
                      "outcome": outcome(document, label_of, member), "document": document}
    checks_file = out / "checks" / "timing.json"
    checks = json.loads(checks_file.read_text()) if checks_file.is_file() else []
    check_each = sum(c["seconds"] for c in checks) / len(checks) if checks else None
    print(f"\nmachine: {os.cpu_count()} CPUs, load average now "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}; output in {out}")
    for name, run in runs.items():
        o, r, t = run["outcome"], run["rates"], run["timing"]
        where = "cgidm audit" if name == "cli" else \
            f"service ({t.get('workers')} worker(s), cgidm submit-audit)"
        print(f"\n== {where}: {r['models']} models, {r['full_models']} full verdicts, wall "
              f"{r['wall']:.0f} s, load {t['load']['min']:.1f}-{t['load']['max']:.1f} (mean "
              f"{t['load']['mean']:.1f})")
        print(f"{'rank':>4} {'model':<30} {'member':>6} {'screen p':>9} {'tier':>6} "
              f"{'p':>9} {'q':>9} flagged")
        for label, row in sorted(o["rows"].items(), key=lambda kv: kv[1]["rank"] or 10**6):
            if row["rank"] is None or row["rank"] <= 8 or member.get(label):
                print(f"{row['rank'] or '-':>4} {label:<30} "
                      f"{'yes' if member.get(label) else 'no':>6} "
                      f"{row['screen_p_value'] or float('nan'):>9.3g} {row['tier']:>6} "
                      f"{row['p_value'] if row['p_value'] is not None else float('nan'):>9.3g}"
                      f" {row['q_value'] if row['q_value'] is not None else float('nan'):>9.3g}"
                      f" {'yes' if row['flagged'] else 'no'}")
        print(f"members' ranks {o['member_ranks']}; flagged {len(o['flagged'])}, false hits "
              f"{len(o['false_hits'])} {o['false_hits'] or ''}: realised FDR {o['fdr']:.3f}; "
              f"members not flagged {o['members_missed']}; errors {o['errors'] or 0}")
        print(f"{'tier':<52} {'s/model':>8} {'models/h':>8}")
        for what, seconds in (
                (f"screen (all {r['models']} models)", r["screen_s_per_model"]),
                (f"full verdict (inversion of {r['full_models']} models)", r["full_s_per_model"]),
                (f"whole audit, wall ({r['other_seconds']:.0f} "
                 f"{'worker-' if r['workers'] > 1 else ''}s outside the models)",
                 r["wall_s_per_model"])):
            print(f"{what:<52} {seconds:>8.1f} {_rate(seconds)}")
        if check_each:
            print(f"vs `cgidm check` per model ({check_each:.1f} s): "
                  f"{check_each / r['wall_s_per_model']:.1f}x")
    if checks:
        print("\n`cgidm check` runs: " + ", ".join(
            f"{c['model']} {c['seconds']:.0f} s (load {c['load']['mean']:.1f})" for c in checks))
    if "cli" in runs and "service" in runs:
        diff = differences(runs["cli"]["outcome"], runs["service"]["outcome"])
        verdict = ("the same ranking, tiers, flags and p/q/screen-p values" if not diff
                   else f"{len(diff)} difference(s)")
        print(f"\nservice vs cgidm audit: {verdict}")
        for line in diff:
            print(f"  {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=25, help="PGD steps of the full verdict")
    parser.add_argument("--cli", action="store_true", help="run `cgidm audit` on the set")
    parser.add_argument("--checks", type=int, default=0,
                        help="time `cgidm check` on this many models of the set")
    parser.add_argument("--service", action="store_true",
                        help="run the audit through the real service")
    parser.add_argument("--workers", type=int, default=1, help="Celery workers (--service)")
    parser.add_argument("--models", type=int, help="only the first N models (a quick try)")
    parser.add_argument("--built", action="store_true",
                        help="only the models of the set already built (while it is built)")
    parser.add_argument("--only", help="only these models of the set (comma-separated labels)")
    parser.add_argument("--out", type=Path, help=f"default: {DEFAULT_OUT}/<steps>steps")
    args = parser.parse_args()
    from benchmarks.audit_set import is_built

    models = audit_set()
    if args.built:
        models = [m for m in models if is_built(m)]
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {m.label for m in models}
        if unknown:
            raise SystemExit(f"not in the set: {', '.join(sorted(unknown))}")
        models = [m for m in models if m.label in wanted]
    if args.models:
        models = models[: args.models]
    missing = [m.label for m in models if not is_built(m)]
    if missing and (args.cli or args.checks or args.service):
        raise SystemExit(f"{len(missing)} model(s) not built yet ({', '.join(missing[:3])}...): "
                         "run python -m benchmarks.audit_set first")
    partial = f"-{len(models)}models" if len(models) != len(audit_set()) else ""
    out = args.out or DEFAULT_OUT / f"{args.steps}steps{partial}"
    out.mkdir(parents=True, exist_ok=True)
    if args.cli:
        run_cli(models, out, args.steps)
    if args.checks:
        run_checks(models, out, args.steps, args.checks)
    if args.service:
        run_service(models, out, args.steps, args.workers)
    report(out)


if __name__ == "__main__":
    main()
