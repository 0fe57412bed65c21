#!/usr/bin/env python3
"""Resources of every CUDA kernel in csrc/, per arch, from the nvcc objects; no GPU needed.

Each csrc/**/*.cu is compiled with the build's own nvcc flags (``python setup.py
--print-nvcc-flags``, as csrc/check_nvcc.sh does) for the asked archs (default sm_80 and sm_90),
plus ``-Xptxas -v``. From the objects (``cuobjdump --dump-resource-usage``) and ptxas' report it
tabulates, per kernel instantiation (demangled with cu++filt or c++filt): registers, stack frame,
spill stores / loads, static shared memory, and the dynamic shared memory its launch requests.
The dynamic sizes are not re-derived here: a .cu whose launches request dynamic shared memory
exports ``<op>_launch_configs`` (see csrc/attention/attention_kernel.h), computed by the
launchers' own templates; a tiny host program linked against the compiled object prints them.
Every other launch must pass a literal 0 (checked in the source).

Failures (exit 1): a .cu that does not compile; a kernel whose register spills sit in a loop
(every kernel in csrc/ is on the training step's path; a spill's STL/LDL inside a backward
branch's range of the SASS is in its hot loop; a value parked once outside every loop is
listed, not failed); static + dynamic shared memory
over the arch's per-block limit (sm_80: 163 KB, sm_90: 227 KB); registers x threads over the
64K-register file; a launch whose dynamic shared memory cannot be evaluated; a launch config that
names no compiled kernel.

    python scripts/check_cuda_resources.py [--arch 80 90] [--jobs 2] [--write-docs]

--write-docs replaces the cuda-table block of docs/gpu.md with the table and the nvcc version.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
DOCS = ROOT / "docs" / "gpu.md"
# Per-block shared memory a kernel may opt into (CUDA programming guide, compute capabilities).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
REG_FILE = 64 * 1024


@dataclass
class Res:
    regs: int = 0
    stack: int = 0
    spill_st: int = 0
    spill_ld: int = 0
    smem: int = 0
    loop_spill: int = 0  # local-memory instructions (STL/LDL) inside a loop of the SASS


@dataclass
class Kernel:
    src: str
    mangled: str
    name: str = ""
    res: dict = field(default_factory=dict)  # arch -> Res
    threads: int | None = None
    dyn: int | None = None  # dynamic shared memory of its launch (bytes)


def log(msg: str) -> None:
    print(f"[cuda-res] {msg}", flush=True)


def find_tool(name: str) -> str | None:
    """A CUDA binary tool: PATH, the toolkit nvcc belongs to, then triton's NVIDIA backend (which
    ships cuobjdump and nvdisasm)."""
    hit = shutil.which(name)
    if hit:
        return hit
    nvcc = shutil.which("nvcc")
    dirs = []
    if nvcc:
        dirs.append(Path(os.path.realpath(nvcc)).parent)
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-x", "cu", "-E", os.devnull],
                text=True,
                capture_output=True,
                timeout=60,
            ).stderr
            m = re.search(r"^#\$ _HERE_=(.+)$", out, re.M)
            if m:
                dirs.append(Path(m.group(1).strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import triton

        dirs.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin")
    except ImportError:
        pass
    for d in dirs:
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return str(d / name)
    return None


def nvcc_flags(archs: list[int]) -> list[str]:
    env = {**os.environ, "R2D2_CUDA_ARCHS": ";".join(str(a) for a in archs)}
    out = subprocess.run(
        [sys.executable, "setup.py", "--print-nvcc-flags"],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
    )
    if out.returncode != 0:
        sys.exit(f"[cuda-res] python setup.py --print-nvcc-flags failed:\n{out.stderr}")
    return [f for f in out.stdout.splitlines() if f.strip()]


def compile_one(src: Path, out_dir: Path, flags: list[str]) -> tuple[Path, Path | None, str, float]:
    obj = out_dir / (src.relative_to(CSRC).as_posix().replace("/", "__") + ".o")
    cmd = ["nvcc", "-c", str(src), "-I", str(CSRC), *flags, "-Xptxas", "-v", "-o", str(obj)]
    t0 = time.time()
    res = subprocess.run(cmd, text=True, capture_output=True)
    dt = time.time() - t0
    if res.returncode != 0:
        return src, None, res.stdout + res.stderr, dt
    return src, obj, res.stderr, dt


def parse_ptxas(text: str) -> dict:
    """(mangled, arch) -> Res from ptxas -v's report."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)", line)
        if m:
            cur = (m.group(1), int(m.group(2)))
            out[cur] = Res()
            continue
        if cur is None:
            continue
        m = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        )
        if m:
            r = out[cur]
            r.stack, r.spill_st, r.spill_ld = (int(x) for x in m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[cur].regs = int(m.group(1))
            m2 = re.search(r"(\d+) bytes smem", line)
            out[cur].smem = int(m2.group(1)) if m2 else 0
    return out


def parse_cuobjdump(text: str) -> dict:
    """(mangled, arch) -> Res (regs, stack, static shared) from --dump-resource-usage."""
    out, arch = {}, None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"arch = sm_(\d+)", line.strip())
        if m:
            arch = int(m.group(1))
            continue
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m and arch is not None and i + 1 < len(lines):
            kv = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", lines[i + 1]))
            out[(m.group(1), arch)] = Res(
                regs=int(kv.get("REG", 0)),
                stack=int(kv.get("STACK", 0)),
                smem=int(kv.get("SHARED", 0)),
            )
    return out


def sass_functions(cuobjdump: str, obj: Path, arch: int) -> dict:
    """mangled name -> [(address, instruction)] of the object's SASS for one arch."""
    text = subprocess.run(
        [cuobjdump, "-sass", "-arch", f"sm_{arch}", str(obj)], text=True, capture_output=True
    ).stdout
    funcs, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2)))
    return funcs


def spills_in_loops(code: list) -> int:
    """Local-memory loads/stores (where spills go) inside a loop: an instruction at address a is in
    one when some branch at b >= a jumps back to t <= a. A spill outside every loop (a value
    parked once and reloaded once) costs a few cycles per thread; one inside a loop costs every
    iteration."""
    loops = []
    for addr, ins in code:
        m = re.search(r"\bBRA\b.*?(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", ins)
        if m and m.group(1) and int(m.group(1), 16) <= addr:
            loops.append((int(m.group(1), 16), addr))
    return sum(
        1
        for addr, ins in code
        if re.search(r"\b(STL|LDL)\b", ins) and any(t <= addr <= b for t, b in loops)
    )


def demangle(names: list[str]) -> dict:
    tool = find_tool("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run(
        [tool], input="\n".join(names) + "\n", text=True, capture_output=True
    ).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def readable(demangled: str) -> str:
    """'void r2d2::attention::(anonymous namespace)::fwd_kernel<__half, 64, 4, 64>(...)' ->
    'fwd_kernel<__half, 64, 4, 64>'."""
    s = demangled.replace("(anonymous namespace)::", "")
    s = re.sub(r"^void ", "", s)
    depth = 0
    for i, c in enumerate(s):
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        elif c == "(" and depth == 0:
            s = s[:i]
            break
    s = re.sub(r"^r2d2::\w+::", "", s)
    return s.replace("(long)", "").strip()


def launches(src_text: str) -> list[tuple[str, list[str]]]:
    """(kernel expression, launch arguments) of every <<<...>>> in a source file."""
    out = []
    for m in re.finditer(r"([\w:<>, ]+?)\s*<<<(.*?)>>>", src_text, re.S):
        args, depth, cur = [], 0, ""
        for c in m.group(2):
            if c in "([{<":
                depth += 1
            elif c in ")]}>":
                depth -= 1
            if c == "," and depth == 0:
                args.append(cur.strip())
                cur = ""
            else:
                cur += c
        args.append(cur.strip())
        out.append((m.group(1).strip(), args))
    return out


def launch_configs(objs: dict, tmp: Path, archs: list[int]) -> tuple[dict, list[str]]:
    """name -> (threads, dynamic smem) from each header's <op>_launch_configs, through a host
    program linked with the op's compiled object; plus failures for launches that request dynamic
    shared memory without such a function."""
    configs, fails = {}, []
    for cu, obj in objs.items():
        text = cu.read_text()
        dynamic = [(k, a) for k, a in launches(text) if len(a) >= 3 and a[2] != "0"]
        header = cu.with_name(cu.name.replace(".cu", ".h"))
        htext = header.read_text() if header.is_file() else ""
        fn = re.search(r"int (\w+_launch_configs)\(LaunchConfig\* \w+, int \w+\);", htext)
        if not fn:
            for k, a in dynamic:
                fails.append(
                    f"{cu.relative_to(ROOT)}: launch of {k} requests dynamic shared "
                    f"memory ({a[2]}) that cannot be evaluated: export "
                    f"<op>_launch_configs from {header.name} (see attention_kernel.h)"
                )
            continue
        if obj is None:
            continue
        ns = f"r2d2::{cu.parent.name}"
        main = tmp / f"{cu.stem}_configs.cpp"
        main.write_text(f"""#include <cstdio>
#include "{header.relative_to(CSRC).as_posix()}"
int main() {{
  static {ns}::LaunchConfig c[4096];
  const int n = {ns}::{fn.group(1)}(c, 4096);
  if (n > 4096) return 2;
  for (int i = 0; i < n; ++i) std::printf("%s\\t%d\\t%zu\\n", c[i].kernel, c[i].threads,
                                          c[i].smem_bytes);
  return 0;
}}
""")
        exe = tmp / f"{cu.stem}_configs"
        # Host code only; the object's device code is linked as it is (both archs).
        res = subprocess.run(
            ["nvcc", "-std=c++17", "-I", str(CSRC), str(main), str(obj), "-o", str(exe)],
            text=True,
            capture_output=True,
        )
        if res.returncode != 0:
            fails.append(
                f"{cu.relative_to(ROOT)}: cannot build the launch-config program:\n"
                f"{res.stderr[-2000:]}"
            )
            continue
        run = subprocess.run([str(exe)], text=True, capture_output=True, timeout=120)
        if run.returncode != 0:
            fails.append(
                f"{cu.relative_to(ROOT)}: {exe.name} exited {run.returncode}: {run.stderr[-500:]}"
            )
            continue
        for line in run.stdout.splitlines():
            name, threads, smem = line.split("\t")
            configs[(cu, name)] = (int(threads), int(smem))
    return configs, fails


def fmt_pair(vals: list, unit: str = "") -> str:
    vals = [str(v) + unit for v in vals]
    return vals[0] if len(set(vals)) == 1 else " / ".join(vals)


def kb(n: int) -> str:
    return f"{n / 1024:.1f}"


def build_table(kernels: list[Kernel], archs: list[int]) -> tuple[list[str], list[str]]:
    fails = []
    arch_s = " / ".join(f"sm_{a}" for a in archs)
    lim_s = " / ".join(f"{SMEM_LIMIT.get(a, 48 * 1024) // 1024}" for a in archs)
    rows = [
        f"| kernel | threads | registers ({arch_s}) | stack B | spill st / ld B | "
        f"static smem KB | dynamic smem KB | total KB (limit {lim_s}) | ok |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    cur_src = None
    for k in kernels:
        if k.src != cur_src:
            cur_src = k.src
            rows.append(f"| **{k.src}** | | | | | | | | |")
        bad = []
        res = [k.res[a] for a in archs]
        dyn = k.dyn or 0
        totals = [r.smem + dyn for r in res]
        for a, r, tot in zip(archs, res, totals):
            if r.loop_spill:
                bad.append(f"spills in a loop on sm_{a} ({r.loop_spill} STL/LDL)")
            limit = SMEM_LIMIT.get(a, 48 * 1024)
            if tot > limit:
                bad.append(f"smem {kb(tot)} KB > {limit // 1024} KB on sm_{a}")
            if k.threads and r.regs * k.threads > REG_FILE:
                bad.append(f"{r.regs} regs x {k.threads} threads > 64K on sm_{a}")
        if k.dyn is None:
            bad.append("dynamic smem unknown")
        spill = fmt_pair(
            [
                f"{r.spill_st}/{r.spill_ld}"
                + (f" ({r.loop_spill} in loops)" if r.loop_spill else "")
                for r in res
            ]
        )
        rows.append(
            f"| `{k.name}` | {k.threads or 'bound'} | {fmt_pair([r.regs for r in res])} | "
            f"{fmt_pair([r.stack for r in res])} | {spill} | "
            f"{fmt_pair([kb(r.smem) for r in res])} | {kb(dyn)} | "
            f"{fmt_pair([kb(t) for t in totals])} | {'FAIL: ' + '; '.join(bad) if bad else 'yes'} |"
        )
        fails += [f"{k.src}: {k.name}: {b}" for b in bad]
    return rows, fails


def write_docs(block: list[str]) -> None:
    text = DOCS.read_text()
    pat = re.compile(r"(<!-- BEGIN cuda-table[^\n]*-->\n)(.*?)(<!-- END cuda-table -->)", re.S)
    if not pat.search(text):
        sys.exit(f"[cuda-res] no cuda-table block in {DOCS}")
    body = "\n".join(block) + "\n"
    DOCS.write_text(pat.sub(lambda m: m.group(1) + body + m.group(3), text, count=1))
    log(f"wrote the cuda-table block of {DOCS.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--keep", type=Path, help="keep objects and programs in this folder")
    args = ap.parse_args(argv)
    if not shutil.which("nvcc"):
        log("no nvcc on PATH")
        return 1
    cuobjdump = find_tool("cuobjdump")
    nvcc_version = re.search(
        r"release [\d.]+, V[\d.]+",
        subprocess.run(["nvcc", "--version"], text=True, capture_output=True).stdout,
    )
    nvcc_version = nvcc_version.group(0) if nvcc_version else "unknown"
    flags = nvcc_flags(args.arch)
    log(f"nvcc {nvcc_version}; cuobjdump: {cuobjdump or 'not found (ptxas -v only)'}")
    log(f"flags: {' '.join(flags)}")
    sources = sorted(CSRC.rglob("*.cu"))
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="r2d2-cuda-res.")) if args.keep is None else args.keep
    tmp.mkdir(parents=True, exist_ok=True)
    fails: list[str] = []
    kernels: list[Kernel] = []
    objs = {}
    sass: dict = {}
    try:
        with cf.ThreadPoolExecutor(max(1, args.jobs)) as ex:
            futs = [ex.submit(compile_one, s, tmp, flags) for s in sources]
            results = [f.result() for f in futs]
        for src, obj, text, dt in results:
            rel = src.relative_to(ROOT).as_posix()
            objs[src] = obj
            if obj is None:
                log(f"{rel}: DOES NOT COMPILE ({dt:.0f}s)")
                print(text[-4000:], file=sys.stderr)
                fails.append(f"{rel}: does not compile")
                continue
            log(f"{rel}: compiled in {dt:.0f}s")
            ptx = parse_ptxas(text)
            cub = {}
            if cuobjdump:
                dump = subprocess.run(
                    [cuobjdump, "--dump-resource-usage", str(obj)], text=True, capture_output=True
                )
                cub = parse_cuobjdump(dump.stdout)
            names = sorted({m for m, _ in ptx})
            dem = demangle(names)
            for m in names:
                k = Kernel(rel, m, readable(dem[m]))
                for a in args.arch:
                    if (m, a) not in ptx:
                        fails.append(f"{rel}: {k.name}: not compiled for sm_{a}")
                        k.res[a] = Res()
                        continue
                    r = ptx[(m, a)]
                    c = cub.get((m, a))
                    if c is not None:
                        # Registers and stack from the object; ptxas adds the spill counts. Its
                        # static shared memory is kept: on sm_90 cuobjdump's SHARED also counts
                        # the 1 KB the system reserves per block, which the 227 KB opt-in limit
                        # does not include.
                        if c.regs != r.regs:
                            log(f"note: {k.name} sm_{a}: cuobjdump {c.regs} regs, ptxas {r.regs}")
                        r = Res(c.regs, c.stack, r.spill_st, r.spill_ld, r.smem)
                    if (r.spill_st or r.spill_ld) and cuobjdump:
                        if (obj, a) not in sass:
                            sass[(obj, a)] = sass_functions(cuobjdump, obj, a)
                        r.loop_spill = spills_in_loops(sass[(obj, a)].get(m, [(0, "LDL")]))
                    k.res[a] = r
                kernels.append(k)
        configs, cfails = launch_configs(objs, tmp, args.arch)
        fails += cfails
        by_name = {}
        for k in kernels:
            by_name.setdefault((ROOT / k.src, k.name.split("::")[-1]), []).append(k)
        for (cu, name), (threads, smem) in configs.items():
            hits = by_name.get((cu, name), [])
            if len(hits) != 1:
                fails.append(
                    f"{cu.relative_to(ROOT)}: launch config {name} matches {len(hits)} "
                    "compiled kernels (expected 1)"
                )
            for k in hits:
                k.threads, k.dyn = threads, smem
        # Files whose launches all pass 0 bytes: no dynamic shared memory anywhere in them.
        for k in kernels:
            if k.dyn is None:
                text = (ROOT / k.src).read_text()
                if all(len(a) >= 3 and a[2] == "0" for _, a in launches(text)):
                    k.dyn = 0
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    kernels.sort(key=lambda k: (k.src, k.name))
    rows, tfails = build_table(kernels, args.arch)
    fails += tfails
    elapsed = time.time() - t0
    n_spill = sum(1 for k in kernels for r in k.res.values() if r.spill_st or r.spill_ld)
    n_loop = sum(1 for k in kernels for r in k.res.values() if r.loop_spill)
    summary = (
        f"{len(kernels)} kernels from {len(sources)} .cu files, "
        f"{' and '.join(f'sm_{a}' for a in args.arch)}, nvcc {nvcc_version}: "
        f"{'all compile' if not any('compile' in f for f in fails) else 'COMPILE FAILURES'}, "
        f"{n_spill} kernel x arch spilling ({n_loop} inside a loop), {len(fails)} failures"
    )
    block = [
        f"Generated by `python scripts/check_cuda_resources.py --write-docs` with nvcc "
        f"{nvcc_version} and the build's flags (`python setup.py --print-nvcc-flags`). "
        "Registers and stack from `cuobjdump --dump-resource-usage`; static shared memory "
        "(without sm_90's 1 KB per-block system reserve) and spills from `ptxas -v` (a spill fails the check when its STL/LDL sit inside a loop of the SASS, "
        "i.e. between a backward branch and its target; one outside every loop is a value "
        "parked once and is listed only); dynamic shared memory is what each launch requests "
        "(`*_launch_configs`, computed by the launchers' own templates; `0` in the launch "
        "otherwise). `threads` is the launch's block size (`bound`: the kernel's "
        "`__launch_bounds__`, set per launch). Values differing between archs are shown "
        "`sm_80 / sm_90`.",
        "",
        *rows,
        "",
        f"Summary: {summary}.",
    ]
    print("\n".join(block))
    for f in fails:
        log(f"FAIL {f}")
    log(f"{summary} ({elapsed:.0f}s)")
    if args.write_docs:
        write_docs(block)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
