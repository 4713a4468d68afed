"""kernels.cu through CUDA's own NVRTC and ptxas on a machine without a GPU (scripts/nvrtc_check.sh).

Compiles the source the `cuda` feature hands NVRTC at start-up with the options it uses
(`--gpu-architecture=<arch> --std=c++17`), then assembles the PTX with ptxas for the same
architecture and prints, per kernel, its registers, spill bytes and static shared memory: what a
GPU call would first show (a compile error) and what limits a kernel's occupancy (registers).
Exit 1 on a compile error.

usage: python nvrtc_check.py SOURCE ARCH
"""
import ctypes
import os
import re
import subprocess
import sys
import tempfile

import nvidia.cu13 as cu


def nvrtc():
    lib = os.path.join(list(cu.__path__)[0], "lib")
    # NVRTC opens its builtins library by name at compile time: loaded first, it is found.
    ctypes.CDLL(os.path.join(lib, "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(os.path.join(lib, "libnvrtc.so.13"))


def compile_ptx(src: str, arch: str) -> str:
    n = nvrtc()
    prog = ctypes.c_void_p()
    ok = n.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"kernels.cu", 0, None, None)
    if ok != 0:
        sys.exit(f"nvrtcCreateProgram: error {ok}")
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    res = n.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    n.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    n.nvrtcGetProgramLog(prog, log)
    if res != 0:
        print(log.value.decode(errors="replace"))
        sys.exit(f"NVRTC could not compile the kernels for {arch}")
    n.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    if n.nvrtcGetPTX(prog, ptx) != 0:
        sys.exit("nvrtcGetPTX failed")
    return ptx.value.decode()


def main() -> None:
    src_path, arch = sys.argv[1], sys.argv[2]
    ptx = compile_ptx(open(src_path).read(), arch)
    ptxas = os.path.join(list(cu.__path__)[0], "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "kernels.ptx")
        open(p, "w").write(ptx)
        out = subprocess.run(
            [ptxas, f"-arch={arch}", "-v", p, "-o", os.path.join(d, "k.cubin")],
            capture_output=True,
            text=True,
        )
    if out.returncode != 0:
        print(out.stderr)
        sys.exit("ptxas could not assemble the PTX")
    # ptxas's warnings and its notes of lost performance (C7510-C7515: wgmma serialised where it
    # cannot prove the registers untouched).
    for line in out.stderr.splitlines():
        if "warning" in line.lower() or "Potential Performance Loss" in line or "(C75" in line:
            print(line)
    # ptxas -v: "Compiling entry function 'NAME' for 'sm_90'", then "N bytes stack frame, N bytes
    # spill stores, N bytes spill loads" and "Used N registers, ... N bytes smem ...".
    rows, name, spills = [], None, 0
    for line in out.stderr.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            spills = int(m.group(1)) + int(m.group(2))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            smem = re.search(r"(\d+) bytes smem", line)
            rows.append((name, int(m.group(1)), spills, int(smem.group(1)) if smem else 0))
            name, spills = None, 0
    print(f"{len(rows)} kernels compiled by NVRTC and assembled by ptxas for {arch}")
    print(f"{'kernel':<44} {'registers':>9} {'spill B':>8} {'smem B':>7}")
    for r in sorted(rows):
        print(f"{r[0]:<44} {r[1]:>9} {r[2]:>8} {r[3]:>7}")
    spilled = [r[0] for r in rows if r[2] > 0]
    if spilled:
        print(f"spilling registers to local memory: {', '.join(spilled)}")


if __name__ == "__main__":
    main()
