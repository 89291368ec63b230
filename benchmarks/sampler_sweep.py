"""Sampler sweep: quality per network evaluation and per second, for one trained run.

Every combination of sampler x spacing x NFE (x guidance interval x feature-cache interval) is
scored with `nrdm.metrics.evaluate` (FID and class accuracy on the run's feature network, the
same n, seed and classes for all), timed, and appended to OUT/sweep.jsonl (a rerun skips what is
there). NFE counts network evaluations per sample (a guided pair is one, as DiT counts): steps
for every sampler but heun, whose steps cost 2 each but the last. The script then plots FID and
class accuracy against NFE and against seconds (OUT/*.png, with the real-vs-real FID at the same n,
kept in OUT/floor.json) and prints, for plain guidance and for each guidance interval, the best
setting, the best 10-NFE setting against it and the fewest NFE within 10% of it; the guidance
interval's FID and speed against plain guidance; and the cache's speed-up against its FID cost.

    python benchmarks/sampler_sweep.py runs/digits --out runs/sweep-digits [--n 500]
        [--samplers dpm++2m unipc ...] [--spacings uniform karras logsnr] [--nfe 5 10 15 25 50 100 250]
        [--intervals none 0.3,3] [--cache 1 2 3 5] [--precisions fp32 bf16] [--compile off on]

--precisions and --compile time the network under autocast and torch.compile (sample.precision,
sample.compile); the report gives their images per second against fp32 eager at the same setting.
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from nrdm.diffusion import SAMPLERS, SPACINGS  # noqa: E402
from nrdm.factory import load_run  # noqa: E402
from nrdm.metrics.evaluate import evaluate, feature_network, real_floor  # noqa: E402


def steps_for(sampler: str, nfe: int) -> int:
    return (nfe + 1) // 2 if sampler == "heun" else nfe


def key_of(row: dict) -> str:
    return "|".join(str(row.get(k, d)) for k, d in (("sampler", None), ("spacing", None), ("nfe", None),
                                                      ("interval", None), ("cache", None), ("precision", "fp32"),
                                                      ("compile", "off")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--spacings", nargs="+", default=["uniform", "karras", "logsnr"], choices=SPACINGS)
    parser.add_argument("--nfe", nargs="+", type=int, default=[5, 10, 15, 25, 50, 100, 250])
    parser.add_argument("--intervals", nargs="+", default=["none"],
                        help="guidance intervals: none, or LO,HI in sigma (e.g. 0.3,3)")
    parser.add_argument("--cache", nargs="+", type=int, default=[1], help="feature-cache intervals")
    parser.add_argument("--cfg", type=float, help="guidance scale (default: the run's)")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "sweep.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    done = {key_of(r) for r in rows}
    cfg, model, schedule, ckpt = load_run(args.run)
    net = feature_network(cfg.data, progress=False)
    base = dataclasses.replace(cfg.sample, seed=args.seed, **({} if args.cfg is None else {"cfg_scale": args.cfg}))
    todo = [dict(sampler=s, spacing=p, nfe=k, interval=i, cache=c, precision=q, compile=m)
            for s in args.samplers for p in args.spacings for k in args.nfe for i in args.intervals
            for c in args.cache for q in args.precisions for m in args.compile if not (s == "heun" and k < 3)]
    for row in todo:
        if key_of(row) in done:
            continue
        interval = None if row["interval"] == "none" else [float(v) for v in row["interval"].split(",")]
        cfg.sample = dataclasses.replace(base, sampler=row["sampler"], spacing=row["spacing"],
                                         steps=steps_for(row["sampler"], row["nfe"]), guidance_interval=interval,
                                         cache_interval=row["cache"], precision=row["precision"],
                                         compile=row["compile"] == "on")
        start = time.perf_counter()
        result = evaluate(model, schedule, cfg, n=args.n, net=net, progress=False)
        row.update(seconds=time.perf_counter() - start, fid=result["metrics"]["fid"],
                   class_accuracy=result["metrics"].get("class_accuracy"), cfg_scale=base.cfg_scale,
                   n=args.n, checkpoint=str(ckpt))
        rows.append(row)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{key_of(row):<40} FID {row['fid']:7.3f}  acc {row['class_accuracy']:.3f}  {row['seconds']:6.1f}s",
              flush=True)
    report(rows, out, floor_of(cfg, args.n, out, net))


def floor_of(cfg, n: int, out: Path, net) -> float:
    """The real-vs-real FID at the sweep's n (the best any sampler can show), kept in OUT/floor.json."""
    path = out / "floor.json"
    if not path.exists():
        path.write_text(json.dumps({"fid": real_floor(cfg.data, n, net=net)["fid"], "n": n}))
    return json.loads(path.read_text())["fid"]


# one colour per sampler, one line style per spacing; hollow squares for a guidance interval,
# a cache, autocast or compile, so every line of a full sweep is told apart
SAMPLER_COLORS = dict(zip(SAMPLERS, plt.get_cmap("tab10").colors))
SPACING_STYLES = {"uniform": "-", "trailing": "-", "leading": ":", "karras": "--", "logsnr": "-."}


def label_of(r: dict) -> str:
    return f"{r['sampler']} {r['spacing']}" + (f" gi {r['interval']}" if r["interval"] != "none" else "") + (
        f" cache {r['cache']}" if r["cache"] > 1 else "") + (
        f" {r['precision']}" if r["precision"] != "fp32" else "") + (" compiled" if r["compile"] == "on" else "")


def plot(rows: list[dict], metric: str, axis: str, path: Path, floor: float | None) -> None:
    """Quality against NFE or seconds, one line per setting. FID is clipped at 4x the best so
    that a failed setting does not flatten the rest; its points sit at the top edge as triangles
    and its legend entry gives the worst value."""
    lines: dict[str, list] = {}
    for r in rows:
        lines.setdefault(label_of(r), []).append(r)
    top = 4 * min(r["fid"] for r in rows) if metric == "fid" else None
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, group in sorted(lines.items()):
        group.sort(key=lambda r: r[axis])
        xs, ys = [r[axis] for r in group], [r[metric] for r in group]
        plain = group[0]["interval"] == "none" and group[0]["cache"] == 1 and group[0]["precision"] == "fp32" \
            and group[0]["compile"] == "off"
        style = dict(color=SAMPLER_COLORS.get(group[0]["sampler"]),
                     linestyle=SPACING_STYLES.get(group[0]["spacing"], "-"))
        if top is not None and max(ys) > top:
            name += f" (off scale, up to {max(ys):.3g})"
            ax.plot([x for x, y in zip(xs, ys) if y > top], [top] * sum(y > top for y in ys), marker="^",
                    linestyle="none", markersize=9, color=style["color"])
            ys = [min(y, top) for y in ys]
        ax.plot(xs, ys, marker="o" if plain else "s", fillstyle="full" if plain else "none", label=name, **style)
    if floor is not None:
        ax.axhline(floor, color="black", linewidth=1, linestyle=":", label=f"real vs real at the same n ({floor:.3f})")
    ax.set_xscale("log")
    if metric == "fid":
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("network evaluations per sample" if axis == "nfe" else "seconds for the evaluation set")
    ax.set_ylabel("FID (domain network)" if metric == "fid" else "class accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def same_setting(a: dict, b: dict, *keys) -> bool:
    return all(a.get(k) == b.get(k) for k in keys)


def report(rows: list[dict], out: Path, floor: float | None = None) -> None:
    for r in rows:                                  # rows from before the precision and compile columns
        r.setdefault("precision", "fp32")
        r.setdefault("compile", "off")
    eager = [r for r in rows if r["precision"] == "fp32" and r["compile"] == "off"]
    plain = [r for r in eager if r["cache"] == 1 and r["interval"] == "none"]
    for interval in sorted({r["interval"] for r in eager}):     # plain guidance, then each interval
        same = [r for r in eager if r["cache"] == 1 and r["interval"] == interval]
        best = min(same, key=lambda r: r["fid"])
        print(f"guidance interval {interval}: best <= 250 NFE {key_of(best)} FID {best['fid']:.3f}")
        at10 = [r for r in same if r["nfe"] <= 10]
        if at10:
            best10 = min(at10, key=lambda r: r["fid"])
            print(f"  best <= 10 NFE {key_of(best10)} FID {best10['fid']:.3f} = "
                  f"{best10['fid'] / best['fid']:.2f}x the best")
        # the default to recommend: the fewest evaluations whose FID is within 10% of the best
        cheapest = min((r for r in same if r["fid"] <= 1.1 * best["fid"]), key=lambda r: (r["nfe"], r["fid"]))
        print(f"  fewest NFE within 10% of the best: {key_of(cheapest)} FID {cheapest['fid']:.3f}")
    setting = ("sampler", "spacing", "nfe", "interval")
    for r in eager:
        if r["cache"] > 1:
            ref = [q for q in plain if same_setting(q, r, *setting)]
            if ref:
                print(f"cache {r['cache']} on {key_of(ref[0])}: {ref[0]['seconds'] / r['seconds']:.2f}x faster, "
                      f"FID {r['fid'] / ref[0]['fid']:.2f}x")
    for r in eager:
        if r["interval"] != "none" and r["cache"] == 1:
            ref = [q for q in plain if same_setting(q, r, "sampler", "spacing", "nfe")]
            if ref:
                print(f"guidance interval {r['interval']} on {key_of(ref[0])}: FID {r['fid']:.3f} against "
                      f"{ref[0]['fid']:.3f} ({r['fid'] / ref[0]['fid']:.2f}x), "
                      f"{ref[0]['seconds'] / r['seconds']:.2f}x faster")
    for r in rows:
        if r["precision"] != "fp32" or r["compile"] != "off":
            ref = [q for q in eager if same_setting(q, r, *setting, "cache")]
            if ref:
                print(f"{r['precision']}, compile {r['compile']} on {key_of(ref[0])}: "
                      f"{ref[0]['seconds'] / r['seconds']:.2f}x the images per second of fp32 eager, "
                      f"FID {r['fid']:.3f} against {ref[0]['fid']:.3f}")
    for metric in ("fid", "class_accuracy"):
        for axis in ("nfe", "seconds"):
            plot(rows, metric, axis, out / f"{metric}_vs_{axis}.png", floor if metric == "fid" else None)
    print(f"wrote {out}/sweep.jsonl and plots")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
