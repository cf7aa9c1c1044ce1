#!/usr/bin/env python3
"""What a fuzz target's corpus reaches, function by function.

    python3 fuzz/coverage.py TARGET [REGEX]     # from the repository root

Runs the libFuzzer binary built by `cargo xtask fuzz` once over its corpus
(`target/fuzz/corpus/TARGET` and the checked-in seeds) under gdb, adds up the
coverage counters after every input (libFuzzer clears them before each one),
and prints, for each function whose name matches REGEX (default: Tessera's
crates), how many of its instrumented blocks ran. Functions where fewer than
half ran come first; `--all` prints every one.

Needs gdb, nm (binutils) and python3. No sanitizer runtime or llvm-cov: the
block addresses come from the binary's `__sancov_pcs` table, the counters
from `__sancov_cntrs`, the function bounds from `nm`.
"""

import os
import sys

try:
    import gdb  # noqa: F401  (present only when gdb runs this file)
except ImportError:
    gdb = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_REGEX = r"^<?(vgpu|vgpu_abi|devices|vmm|tessera)::"


def in_gdb():
    """Inside gdb: run the binary, OR the counters after each input, dump them at exit."""
    out = os.environ["TESSERA_COV_OUT"]
    inferior = gdb.selected_inferior

    def addr(sym):
        return int(gdb.parse_and_eval(f"(unsigned long)&{sym}"))

    state = {}

    class Finished(gdb.FinishBreakpoint):
        def stop(self):
            c0, n = state["cntrs"]
            m = inferior().read_memory(c0, n).tobytes()
            acc = state["acc"]
            for i, b in enumerate(m):
                if b:
                    acc[i] = 1
            return False

    class Input(gdb.Breakpoint):
        def stop(self):
            if "cntrs" not in state:
                c0 = addr("__start___sancov_cntrs")
                n = addr("__stop___sancov_cntrs") - c0
                state["cntrs"] = (c0, n)
                state["acc"] = bytearray(n)
            Finished(gdb.newest_frame(), internal=True)
            return False

    class Exit(gdb.Breakpoint):
        def stop(self):
            p0 = addr("__start___sancov_pcs")
            p1 = addr("__stop___sancov_pcs")
            pcs = inferior().read_memory(p0, p1 - p0).tobytes()
            with open(out, "wb") as f:
                # Runtime address of the counters' start symbol, then the PC table, then
                # the accumulated counters.
                f.write(addr("__start___sancov_cntrs").to_bytes(8, "little"))
                f.write(len(pcs).to_bytes(8, "little"))
                f.write(pcs)
                f.write(bytes(state.get("acc", b"")))
            return True

    gdb.execute("set language c")
    Input("LLVMFuzzerTestOneInput", internal=True)
    Exit("exit", internal=True)


def main():
    import bisect
    import re
    import shlex
    import signal
    import struct
    import subprocess
    import tempfile

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    show_all = "--all" in sys.argv
    if not args:
        sys.exit(__doc__)
    target = args[0]
    pattern = re.compile(args[1] if len(args) > 1 else DEFAULT_REGEX)
    binary = os.path.join(ROOT, "fuzz/target/x86_64-unknown-linux-gnu/release", target)
    if not os.path.exists(binary):
        sys.exit(f"{binary} is missing: build it with `cargo xtask fuzz {target} --time 1`")
    corpora = [
        d
        for d in (
            os.path.join(ROOT, "target/fuzz/corpus", target),
            os.path.join(ROOT, "fuzz/corpus", target),
        )
        if os.path.isdir(d)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        dump = os.path.join(tmp, "coverage")
        env = dict(os.environ, TESSERA_COV_OUT=dump)
        gdb = subprocess.Popen(
            # `run ARGS` replaces the argument list, so the arguments go there, not --args.
            ["gdb", "-q", "-batch", "-x", os.path.abspath(__file__)]
            + ["-ex", " ".join(["run", "-runs=0", *map(shlex.quote, corpora), ">/dev/null 2>&1"])]
            + ["-ex", "kill", binary],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Stopped by a signal (`timeout`, a closed terminal), gdb must go too, and take the
        # replay with it: a SIGKILLed gdb would leave its inferior running.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: sys.exit(1))
        try:
            _, stderr = gdb.communicate()
        finally:
            if gdb.poll() is None:
                gdb.terminate()
                gdb.wait()
        if not os.path.exists(dump):
            sys.exit(f"gdb did not produce the coverage dump:\n{stderr[-2000:]}")
        data = open(dump, "rb").read()
    cntrs_start = int.from_bytes(data[0:8], "little")
    npcs = int.from_bytes(data[8:16], "little")
    table = data[16 : 16 + npcs]
    counters = data[16 + npcs :]
    if len(counters) * 16 != len(table):
        sys.exit("the PC table and the counters disagree in length")

    symbols = subprocess.run(
        ["nm", "-C", "-S", "--defined-only", binary], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    link_cntrs = next(
        int(line.split()[0], 16) for line in symbols if line.endswith(" __start___sancov_cntrs")
    )
    base = cntrs_start - link_cntrs
    pcs = sorted(
        (struct.unpack_from("<Q", table, 16 * i)[0] - base, i) for i in range(len(counters))
    )
    keys = [pc for pc, _ in pcs]
    rows = []
    for line in symbols:
        parts = line.split(" ", 3)
        if len(parts) < 4 or parts[2] not in "tT":
            continue
        name = parts[3]
        if not pattern.search(name) or "drop_glue" in name:
            continue
        start, size = int(parts[0], 16), int(parts[1], 16)
        lo, hi = bisect.bisect_left(keys, start), bisect.bisect_left(keys, start + size)
        blocks = [pcs[k][1] for k in range(lo, hi)]
        if blocks:
            ran = sum(1 for i in blocks if counters[i])
            rows.append((ran / len(blocks), ran, len(blocks), name))
    rows.sort()
    ran_all = sum(1 for c in counters if c)
    print(f"{target}: {ran_all} of {len(counters)} instrumented blocks ran over the corpus")
    print(f"functions matching {pattern.pattern}: {len(rows)}, "
          f"{sum(1 for r in rows if r[1] == 0)} never entered")
    for frac, ran, total, name in rows:
        if show_all or frac < 0.5:
            print(f"{ran:5}/{total:<5} {name[:160]}")


if gdb is not None:
    in_gdb()
elif __name__ == "__main__":
    main()
