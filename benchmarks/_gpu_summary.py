"""The headline numbers of a ``gpu_check.sh`` run, against issue 14's and issue 20's figures.

    python benchmarks/_gpu_summary.py OUTPUT_DIR

Reads what the run left (missing files are reported, not fatal): the junit files of the
tests, ``compiled.json``, ``bench.json``, ``offload*.json`` and ``extras.json``.
"""

from __future__ import annotations

import json
import pathlib
import sys
import xml.etree.ElementTree as ET

# issue 14's figures for an H100/H200: (case, what, target)
TARGETS = {"gpu-1b": 0.93, "gpu-bf16": 0.85}
SMALL_MS = 0.6
HIDDEN = 0.80


def load(folder: pathlib.Path, name: str):
    path = folder / name
    if not path.exists():
        print(f"{name}: missing (that part did not finish)")
        return None
    if name.endswith(".xml"):
        return ET.parse(path).getroot()
    return json.loads(path.read_text())


def tests(folder: pathlib.Path) -> None:
    for name in ("cuda-tests.xml", "compiled-tests.xml", "suite.xml"):
        root = load(folder, name)
        if root is None:
            continue
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        a = suite.attrib
        print(
            f"{name}: {a.get('tests')} tests, {a.get('failures')} failed, "
            f"{a.get('errors')} errors, {a.get('skipped')} skipped"
        )
        for case in suite.iter("testcase"):
            for bad in list(case.findall("failure")) + list(case.findall("error")):
                print(
                    f"   FAIL {case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:150]}"
                )


def compiled(folder: pathlib.Path) -> None:
    res = load(folder, "compiled.json")
    if res is None:
        return
    info, out = res["info"], res["compiled"]
    print(f"compiled: {info['device']}, torch {info['torch']}, {out['params']} x {out['numel']:,}")
    for name, case in out["cases"].items():
        rows = case["rows"]
        wrapper, ref = rows["compiled wrapper"]["cost"], rows["one-graph ref"]["cost"]
        print(
            f"   {name:<12} EMA cost over the compiled inner step: wrapper {wrapper:+.2f}, one-graph ref "
            f"{ref:+.2f}; eager wrapper over eager inner {rows['eager wrapper']['cost_eager']:+.2f}"
        )
        for line in case["verdicts"]:
            print(f"      {line}")


def cases(folder: pathlib.Path) -> None:
    bench = load(folder, "bench.json")
    if bench is None:
        return
    print(f"bench: {bench['info']['device']}, torch {bench['info']['torch']}")
    for res in bench.get("cases", []):
        ours = res["methods"].get("ema_optim.step", {})
        if "seconds" not in ours:
            print(f"   {res['case']}: ema_optim.step {ours.get('skipped', 'missing')}")
            continue
        frac = res["floor_seconds"] / ours["seconds"]
        per_param = res["bytes_moved"] / res["numel"]
        line = (
            f"   {res['case']:<10} {ours['seconds'] * 1e3:8.3f} ms  {frac:6.1%} of the copy floor "
            f"({per_param:.0f} B/param at {res['copy_bandwidth'] / 1e9:.0f} GB/s)  "
            f"{ours['x_best_peer'] or float('nan'):.2f}x best peer ({res['best_peer']})"
        )
        target = TARGETS.get(res["case"])
        if target is not None:
            line += f"  target >= {target:.0%}: " + ("reached" if frac >= target else "NOT reached")
        if res["case"] == "small-10k":
            line += f"  target <= {SMALL_MS} ms: " + (
                "reached" if ours["seconds"] * 1e3 <= SMALL_MS else "NOT reached"
            )
        print(line)


def offload(folder: pathlib.Path) -> None:
    for name in ("offload.json", "offload-every10.json"):
        res = load(folder, name)
        if res is None:
            continue
        ms = ", ".join(f"{k} {v:.2f}" for k, v in res["ms_per_step"].items())
        hidden = res["hidden"]
        verdict = (
            "-"
            if hidden is None
            else f"{hidden:.0%} hidden (target >= {HIDDEN:.0%}: "
            + ("reached)" if hidden >= HIDDEN else "NOT reached)")
        )
        print(
            f"{name}: {res['params'] / 1e6:.0f}M params, update_every {res['args']['every']}: "
            f"{ms} ms/step; {verdict}"
        )


def extras(folder: pathlib.Path) -> None:
    res = load(folder, "extras.json")
    if res is None:
        return
    for name, v in res.get("host", {}).get("verdicts", {}).items():
        print(
            f"host {name}: {v['host_few'] * 1e6:.0f} -> {v['host_many'] * 1e6:.0f} us, "
            f"calls x{v['x_calls']:.2f}, flat: {v['flat']}"
        )
    for label, v in res.get("swa", {}).items():
        row = v["rows"][v["acceptance_row"]]
        print(f"swa {label}: {v['acceptance_row']} {row['x_swa']:.2f}x swa_utils")
    for label, v in res.get("shadows", {}).items():
        print(f"shadows {label}: 2 shadows / 1 = {v['two_over_one']}")


def main() -> None:
    folder = pathlib.Path(sys.argv[1])
    for section in (tests, compiled, cases, offload, extras):
        try:
            section(folder)
        except Exception as e:  # noqa: BLE001 - a malformed file must not hide the others
            print(f"{section.__name__}: could not read ({type(e).__name__}: {e})")


if __name__ == "__main__":
    main()
