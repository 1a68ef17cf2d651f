"""Overhead of running UniMiSS pre-training through the launcher (Ray Train), and 2x1 vs 1x2 scaling.

In one run on one machine:

1. ``launch 1x2``: ``tasks.recipes.unimiss.train_unimiss`` through ``infra.launcher.launch``
   (1 Ray Train worker, 2 torch threads, MLflow per-step logging on, as in a flow), against
   ``bare 1x2``: a plain PyTorch loop doing the recipe's work per step (same
   ``UniMiSSStudentTeacher(MiT(MiTConfig.cpu_small()), UniMiSSConfig.cpu_small())``, same
   seeds, same ``make_views`` crops and augmentations, same optimiser step) in a fresh
   process with the environment a worker gets (``worker_env``: threads, OpenMP wait policy),
   without Ray, DDP, ``torch.distributed`` or MLflow. Same seeds and one worker mean both see
   the very same samples: their per-epoch losses must agree (printed; 0.0 = the same work).
2. ``launch 2x1`` (2 workers x 1 thread, per-worker batch halved, so the same global batch)
   against ``launch 1x2``, in samples/s (steps/s x global batch).
   ``--single-thread`` adds ``bare 1x1`` vs ``launch 1x1``: launcher overhead without
   intra-op threading.

Only steady-state steps are timed: each epoch's ``steps_per_s`` (the recipe's own metric,
read back from its checkpoints; the bare loop times its epochs the same way), without the
first ``--skip`` epochs (first 2D and first 3D epoch: warm-up). Epochs alternate 2D, 3D, 2D...
(``interval=1``); 2D and 3D are reported separately, "both" is the alternating rate
2 / (1/2D + 1/3D). The machine is shared, so each figure is the best epoch of its kind
(median in brackets), and the bare loop runs twice (before and after ``launch 1x2``) and
keeps the better of each epoch. Data: ``phantom-ct``, ``synthetic-cxr`` and ``chest-cr-rg1``
ingested with profile ``smoke`` into a temporary MEDFOUNDRY_HOME (deleted afterwards).

Run: ``python benchmarks/train_overhead.py [--steps 20] [--epochs 8] [--out FILE.json]``
(``--steps`` = steps per epoch; default output ``benchmarks/out/train_overhead.json``).

Measured 2026-11-26 (2 shared cores, load average 1-2 from other tenants; batch 4, views
16x32x32 / 64^2, 20 steps x 8 epochs; "both" = alternating 2D/3D rate, best epoch [median]):

    run (worker niceness)     launch 1x2 / bare 1x2   launch 2x1 / launch 1x2   launch 1x1 / bare 1x1
    1 (Ray default 15)        0.750 [0.772]           1.705 [1.578]
    2 (Ray default 15)        0.882 [0.879]           0.998 [1.049]
    3 (0, now the default)    0.980 [0.918]           1.380 [1.052]
    4 (0)                     0.709 [0.753]           1.737 [1.503]
    5 (0, --single-thread)    0.943 [0.812]           1.104 [1.276]             1.061 [1.084]
    6 (0, --no-mlflow)        1.073 [1.062]           0.909 [0.904]

    run 5 in steps/s:         2D             3D            both
    bare 1x2                  14.12 [14.03]  4.89 [4.75]   7.27 [7.10]
    launch 1x2                14.08 [10.30]  4.53 [4.01]   6.85 [5.77]
    launch 2x1                14.75 [14.14]  5.09 [4.97]   7.57 [7.36]
    bare 1x1                  12.27 [12.25]  4.04 [3.73]   6.08 [5.71]
    launch 1x1                15.11 [14.27]  4.10 [3.96]   6.45 [6.20]

Reading: single-threaded, the launcher costs nothing measurable (1.06x); 2 workers x 1
thread matched or beat 1 worker x 2 threads in every run (0.91-1.7x, target >= 0.9x met).
1 worker x 2 threads through the launcher reaches 0.71-1.07x of the bare loop (target 0.95x
met in 2 of 6 runs; MLflow's per-step logging is flushed outside the timed steps):
its OpenMP team needs both cores at every barrier, and Ray's own processes on the same two
cores (controller, raylet, log monitor: ~9 % of a core, sampled) plus other tenants' load stall
it, which a bare process without Ray beside it does not suffer. Found on the way and fixed:
Ray starts workers at niceness 15 (now ``ray_worker_niceness``, default 0) and libgomp's
spinning barriers (now ``OMP_WAIT_POLICY=PASSIVE`` for multi-threaded workers). Per-epoch
losses of bare and launched 1x2 agree exactly (0.0): the two do the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENTRIES = {"3d": "phantom-ct", "2d": ["synthetic-cxr", "chest-cr-rg1"]}
HYPER = {"interval": 1, "warmup_epochs": 0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per run (alternating 2D, 3D)")
    parser.add_argument("--skip", type=int, default=2, help="warm-up epochs left out of the figures")
    parser.add_argument("--batch", type=int, default=4, help="global batch (per worker: batch / workers)")
    parser.add_argument("--threads", type=int, default=2, help="cores for a run: 1 worker x T threads vs T workers x 1")
    parser.add_argument("--no-mlflow", action="store_true", help="launch without mlflow_run_id (no per-step logging)")
    parser.add_argument("--single-thread", action="store_true",
                        help="also bare 1x1 vs launch 1x1: launcher overhead without intra-op threading (~1.5 min more)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "train_overhead.json")
    parser.add_argument("--keep-home", action="store_true", help="keep the temporary MEDFOUNDRY_HOME")
    args = parser.parse_args()
    if args.epochs < args.skip + 2:
        parser.error("--epochs must leave at least one 2D and one 3D epoch after --skip")
    if args.batch % args.threads:
        parser.error("--batch must divide by --threads (the per-worker batch of the multi-worker run)")
    return args


# ----------------------------------------------------------------------------- set-up
def make_home() -> Path:
    """A temporary MEDFOUNDRY_HOME with the engines pointed at it (before ray/mlflow import)."""
    home = Path(tempfile.mkdtemp(prefix="medfoundry-train-overhead-"))
    os.environ["MEDFOUNDRY_HOME"] = str(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    os.environ["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"] = "false"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return home


def ingest(settings: Any) -> dict[str, str]:
    """Ingest the recipe's entries (profile smoke: 6 cases each); return ``{name: version}``."""
    from tasks.catalog import load_catalog
    from tasks.ingest.run import ingest_entry

    catalog_path = REPO / "catalog.yaml"
    wanted = {ENTRIES["3d"], *ENTRIES["2d"]}
    versions = {}
    for entry in load_catalog(catalog_path).entries:
        if entry.name in wanted:
            summary = ingest_entry(entry, catalog_path.parent, settings, profile="smoke")
            if summary.get("status") not in ("written", "unchanged"):
                raise RuntimeError(f"ingest of {entry.name} failed: {summary}")
            versions[entry.name] = summary["version"]
    missing = wanted - set(versions)
    if missing:
        raise RuntimeError(f"catalog lacks {sorted(missing)}")
    return versions


def recipe_config(store: str, versions: dict[str, str], args: argparse.Namespace, workers: int, threads: int) -> dict[str, Any]:
    return {"store": store, "dataset_3d": ENTRIES["3d"], "version_3d": versions[ENTRIES["3d"]],
            "datasets_2d": [(name, versions[name]) for name in ENTRIES["2d"]], "model_size": "cpu_small",
            "epochs": args.epochs, "steps_per_epoch": args.steps, "batch_size": args.batch // workers,
            "view_3d": [16, 32, 32], "view_2d": 64, "hyper": dict(HYPER), "seed": 0, "threads_per_worker": threads,
            "use_gpu": False, "precision": "fp32"}


# ----------------------------------------------------------------------------- the two ways to train
def bare_loop(config: dict[str, Any]) -> list[dict[str, Any]]:
    """``train_unimiss``'s work for one worker, in this process: no Ray, DDP, process group or MLflow.

    Mirrors the recipe for ``world == 1`` (seeding, model, optimiser, schedules, ``make_views``)
    and calls its very ``optimisation_step``; returns one record per epoch like the recipe's metrics.
    """
    import numpy as np
    import torch

    from infra.runtime import device_and_precision, seed_everything, set_threads
    from models.mit import MiT, MiTConfig
    from models.unimiss import UniMiSSStudentTeacher, param_groups, set_3d_trainable
    from tasks.recipes.data import load_shard
    from tasks.recipes.unimiss import build_hyper, make_views, optimisation_step

    set_threads(int(config["threads_per_worker"]))
    seed_everything(int(config["seed"]), 0)
    device, autocast = device_and_precision(False, config["precision"])
    hp = build_hyper(config["model_size"], config["hyper"], int(config["epochs"]))
    net = UniMiSSStudentTeacher(MiT(getattr(MiTConfig, config["model_size"])()), hp).to(device)
    seed_everything(int(config["seed"]), 0)
    volumes = [c.image for c in load_shard(config["store"], config["dataset_3d"], config["version_3d"], None, 0, 1)]
    images = [c.image for name, version in config["datasets_2d"] for c in load_shard(config["store"], name, version, None, 0, 1)]
    steps_per_epoch = int(config["steps_per_epoch"])
    lr_schedule = hp.lr_schedule(steps_per_epoch, int(config["batch_size"]))
    wd_schedule = hp.weight_decay_schedule(steps_per_epoch)
    momentum_schedule = hp.momentum_schedule(steps_per_epoch)
    optimizer = torch.optim.AdamW(param_groups(net.student, hp.weight_decay))
    gen = torch.Generator().manual_seed(int(config["seed"]) * 1000)
    rng = np.random.default_rng([int(config["seed"]), 0, 0])
    view_3d = tuple(config["view_3d"])

    records, step = [], 0
    for epoch in range(hp.epochs):
        is_3d = not hp.is_2d_epoch(epoch)
        set_3d_trainable(net.student, is_3d)
        losses, started = [], time.perf_counter()
        net.train()
        for _ in range(steps_per_epoch):
            views = make_views(is_3d, volumes, images, int(config["batch_size"]), view_3d, int(config["view_2d"]), rng, gen, device)
            losses.append(optimisation_step(net, net, optimizer, views, epoch, step, hp, float(lr_schedule[step]),
                                            float(wd_schedule[step]), float(momentum_schedule[step]), autocast))
            step += 1
        records.append({"epoch": epoch, "dims": 3 if is_3d else 2, "steps_per_s": steps_per_epoch / (time.perf_counter() - started),
                        "loss": float(np.mean(losses))})
        set_3d_trainable(net.student, True)
    return records


def run_bare(settings: Any, config: dict[str, Any]) -> tuple[list[dict[str, Any]], float]:
    """:func:`bare_loop` in a fresh Python process with exactly the environment a Ray worker of
    ``settings`` gets (:func:`infra.launcher.worker_env`: thread variables, which OpenMP reads
    only at start-up), so the only difference left is Ray Train, the process group and MLflow.
    Returns the per-epoch records and the wall seconds of the whole process."""
    from infra.launcher import worker_env

    env = {**os.environ, **worker_env(settings)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--bare-child", json.dumps(config)], env=env, cwd=REPO,
                          stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - started


def launched(settings: Any, config: dict[str, Any], workers: int, tag: str, use_mlflow: bool) -> tuple[list[dict[str, Any]], float]:
    """Run the recipe through ``launch`` in a fresh Ray session set up for ``settings``.

    Returns per-epoch records (the recipe's own metrics, read back from its checkpoints, all
    kept) and the wall seconds of the launch. ``use_mlflow``: give the recipe an MLflow run,
    so it logs per-step metrics from rank 0 as it does in a flow.
    """
    import ray

    from infra.checkpoint import load_checkpoint
    from infra.launcher import ensure_ray, launch
    from tasks.recipes.unimiss import train_unimiss

    run_id = None
    if use_mlflow:
        import mlflow

        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name("train-overhead")
        experiment_id = experiment.experiment_id if experiment else client.create_experiment("train-overhead")
        run_id = client.create_run(experiment_id, run_name=tag).info.run_id
    if ray.is_initialized():
        ray.shutdown()  # a Ray session's runtime env (thread variables) is fixed at ray.init
    ensure_ray(settings)
    started = time.perf_counter()
    result = launch(train_unimiss, {**config, "mlflow_run_id": run_id}, name=f"{tag}-{int(time.time())}", settings=settings,
                    num_workers=workers, max_failures=0, keep_checkpoints=int(config["epochs"]))
    wall = time.perf_counter() - started
    ray.shutdown()
    result.raise_for_error()
    if run_id is not None:
        client.set_terminated(run_id)
    records = []
    for checkpoint in (p for p in Path(result.path).glob("checkpoint_*") if p.is_dir()):
        saved = load_checkpoint(checkpoint)
        m = saved["metrics"]
        records.append({"epoch": int(saved["epoch"]), "dims": int(m["epoch_dims"]), "steps_per_s": float(m["steps_per_s"]),
                        "loss": float(m["loss"])})
    return sorted(records, key=lambda r: r["epoch"]), wall


# ----------------------------------------------------------------------------- summary
def summarise(records: list[dict[str, Any]], skip: int, global_batch: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dims in (2, 3):
        rates = [r["steps_per_s"] for r in records if r["dims"] == dims and r["epoch"] >= skip]
        out[f"{dims}d"] = {"best": max(rates), "median": statistics.median(rates), "epochs": rates}
    for stat in ("best", "median"):
        out[f"both_{stat}"] = 2 / (1 / out["2d"][stat] + 1 / out["3d"][stat])
    for key in ("2d", "3d"):
        out[key]["samples_per_s_best"] = out[key]["best"] * global_batch
        out[key]["samples_per_s_median"] = out[key]["median"] * global_batch
    return out


def ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """a / b for each figure (2D, 3D, both; best and median)."""
    out = {}
    for stat in ("best", "median"):
        out[f"2d_{stat}"] = a["2d"][stat] / b["2d"][stat]
        out[f"3d_{stat}"] = a["3d"][stat] / b["3d"][stat]
        out[f"both_{stat}"] = a[f"both_{stat}"] / b[f"both_{stat}"]
    return out


def print_table(rows: dict[str, dict[str, Any]], ratios: dict[str, dict[str, float]], global_batch: int) -> None:
    fmt = "{:<26} {:>16} {:>16} {:>16} {:>16}"
    print()
    print(fmt.format("", "2D steps/s", "3D steps/s", "both steps/s", "both samples/s"))
    for name, s in rows.items():
        cells = [f"{s['2d']['best']:.2f} [{s['2d']['median']:.2f}]", f"{s['3d']['best']:.2f} [{s['3d']['median']:.2f}]",
                 f"{s['both_best']:.2f} [{s['both_median']:.2f}]",
                 f"{s['both_best'] * global_batch:.1f} [{s['both_median'] * global_batch:.1f}]"]
        print(fmt.format(name, *cells))
    for name, r in ratios.items():
        cells = [f"{r['2d_best']:.3f} [{r['2d_median']:.3f}]", f"{r['3d_best']:.3f} [{r['3d_median']:.3f}]",
                 f"{r['both_best']:.3f} [{r['both_median']:.3f}]", ""]
        print(fmt.format(name, *cells))
    print("best epoch [median epoch]; samples/s = steps/s x global batch", global_batch)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--bare-child":
        print(json.dumps(bare_loop(json.loads(sys.argv[2]))))
        return
    args = parse_args()
    home = make_home()
    from infra.launcher import worker_env
    from infra.settings import Settings, configure_engines

    t = args.threads
    settings = {f"{w}x{n}": Settings(home=home, num_workers=w, cpus_per_worker=1, threads_per_worker=n, use_gpu=False)
                for w, n in ((1, t), (t, 1), (1, 1))}
    configure_engines(settings[f"1x{t}"])
    load_before = os.getloadavg()
    phases: dict[str, float] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    started = time.perf_counter()

    def timed(name: str, fn: Any, *fn_args: Any) -> None:
        runs[name], phases[f"{name}_s"] = fn(*fn_args)

    try:
        versions = ingest(settings[f"1x{t}"])
        phases["ingest_s"] = time.perf_counter() - started
        store = settings[f"1x{t}"].store
        cfg = {key: recipe_config(store, versions, args, s.num_workers, s.threads_per_worker) for key, s in settings.items()}
        use_mlflow = not args.no_mlflow
        # bare runs bracket launch 1xT (the machine is shared: keep the best of the two)
        timed("bare_a", run_bare, settings[f"1x{t}"], cfg[f"1x{t}"])
        timed(f"launch_1x{t}", launched, settings[f"1x{t}"], cfg[f"1x{t}"], 1, f"overhead-1x{t}", use_mlflow)
        timed("bare_b", run_bare, settings[f"1x{t}"], cfg[f"1x{t}"])
        timed(f"launch_{t}x1", launched, settings[f"{t}x1"], cfg[f"{t}x1"], t, f"overhead-{t}x1", use_mlflow)
        if args.single_thread:
            timed("bare_1x1", run_bare, settings["1x1"], cfg["1x1"])
            timed("launch_1x1", launched, settings["1x1"], cfg["1x1"], 1, "overhead-1x1", use_mlflow)
    finally:
        if not args.keep_home:
            shutil.rmtree(home, ignore_errors=True)
    phases["total_s"] = time.perf_counter() - started

    bare_best = [max(a, b, key=lambda r: r["steps_per_s"]) for a, b in zip(runs["bare_a"], runs["bare_b"])]
    rows = {f"bare 1x{t}": summarise(bare_best, args.skip, args.batch),
            f"launch 1x{t}": summarise(runs[f"launch_1x{t}"], args.skip, args.batch),
            f"launch {t}x1": summarise(runs[f"launch_{t}x1"], args.skip, args.batch)}
    ratios = {f"launch 1x{t} / bare 1x{t}": ratio(rows[f"launch 1x{t}"], rows[f"bare 1x{t}"]),
              f"launch {t}x1 / launch 1x{t}": ratio(rows[f"launch {t}x1"], rows[f"launch 1x{t}"])}
    if args.single_thread:
        rows["bare 1x1"] = summarise(runs["bare_1x1"], args.skip, args.batch)
        rows["launch 1x1"] = summarise(runs["launch_1x1"], args.skip, args.batch)
        ratios["launch 1x1 / bare 1x1"] = ratio(rows["launch 1x1"], rows["bare 1x1"])
    loss_diff = max(abs(b["loss"] - r["loss"]) for b, r in zip(runs["bare_a"], runs[f"launch_1x{t}"]))
    print_table(rows, ratios, args.batch)
    print(f"loss |bare - launch 1x{t}| max over epochs: {loss_diff}  (same seeds and samples: 0 means the same work)")
    print("phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}")

    thread_env = {key: {k: v for k, v in worker_env(s).items() if "THREADS" in k or k.startswith(("OMP_", "GOMP_", "KMP_"))}
                  for key, s in settings.items()}
    report = {
        "machine": {"cpus": len(os.sched_getaffinity(0)), "load_before": load_before, "load_after": os.getloadavg(),
                    "python": sys.version.split()[0]},
        "settings": {"steps_per_epoch": args.steps, "epochs": args.epochs, "skip": args.skip, "global_batch": args.batch,
                     "threads": t, "mlflow_logging": not args.no_mlflow, "hyper": HYPER, "worker_thread_env": thread_env},
        "summary": rows, "ratios": ratios, "targets": {"launch_vs_bare": 0.95, "workers_vs_threads": 0.9},
        "loss_max_diff_bare_vs_launch": loss_diff, "phases_s": phases, "epochs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
