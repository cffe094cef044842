"""CUDA kernels in Bazel 4, offline, without rules_cuda.

cuda_library() compiles its .cu sources with the toolkit's nvcc in one genrule, archives the
objects into a static library and wraps it in a cc_library that links the static CUDA runtime.
C++ code that calls the kernels' host-side launchers depends on it like on any cc_library.

nvcc finds the rest of its toolkit (cicc, ptxas, headers) relative to the path it was started
by. In Bazel's sandbox `external/cuda/bin/nvcc` is a link to the binary alone, in a directory
without the rest of the toolkit, so the genrule starts nvcc by its resolved path (`readlink -f`),
which still follows TESSERA_CUDA_PATH through the @cuda repository. Nothing is downloaded.

Limits, by design: the .cu sources may include their own `hdrs`, other files listed in
`textual_hdrs`, the CUDA toolkit and the C++ standard library, but not headers of `deps` (the
genrule does not see their include paths). Device code is not relocatable (no -rdc), so a kernel
and its launcher live in the same .cu file.
"""

# sm_90 machine code for the H100 and H200, plus compute_90 PTX, which the driver compiles at
# load time for newer GPUs.
CUDA_DEFAULT_GENCODE = [
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]

_NVCC_FLAGS = [
    "-c",
    "-std=c++17",
    "-O2",
    "-Xcompiler",
    "-fPIC",
    "-Xcompiler",
    "-Wall",
]

def cuda_library(
        name,
        srcs,
        hdrs = [],
        textual_hdrs = [],
        deps = [],
        gencode = CUDA_DEFAULT_GENCODE,
        nvcc_flags = [],
        alwayslink = False,
        visibility = None,
        testonly = False,
        tags = []):
    """A cc_library made of CUDA sources compiled by nvcc.

    Args:
      name: the cc_library's name; the genrule is `<name>_nvcc`, the archive `lib<name>_nvcc.a`.
      srcs: .cu files, each compiled to one object.
      hdrs: public headers, as in cc_library; visible to the .cu files as well.
      textual_hdrs: further headers the .cu files include (not exported).
      deps: cc_library deps of the C++ users of this library (not visible to nvcc).
      gencode: nvcc -gencode flags, by default sm_90 SASS plus compute_90 PTX.
      nvcc_flags: extra nvcc flags appended after the defaults.
      alwayslink: as in cc_library (needed when nothing references the objects' symbols).
      visibility: as usual.
      testonly: as usual.
      tags: as usual.
    """
    for src in srcs:
        if not src.endswith(".cu"):
            fail("cuda_library %s: %s is not a .cu file" % (name, src))
    pkg = native.package_name()
    archive = "lib%s_nvcc.a" % name
    flags = " ".join(_NVCC_FLAGS + gencode + nvcc_flags + ["-I.", "-I$(GENDIR)"])

    compile_cmds = []
    for i, src in enumerate(srcs):
        obj = "$$objdir/%d_%s.o" % (i, src.split("/")[-1][:-len(".cu")])
        compile_cmds.append("$$nvcc %s $(location %s) -o %s" % (flags, src, obj))

    native.genrule(
        name = name + "_nvcc",
        srcs = srcs + hdrs + textual_hdrs,
        outs = [archive],
        tools = ["@cuda//:nvcc"],
        cmd = " && ".join([
            "nvcc=$$(readlink -f $(location @cuda//:nvcc))",
            "objdir=$$(mktemp -d)",
            "trap 'rm -rf $$objdir' EXIT",
        ] + compile_cmds + [
            "ar rcs $@ $$objdir/*.o",
        ]),
        message = "nvcc %s" % ", ".join([pkg + "/" + s for s in srcs]),
        testonly = testonly,
        tags = tags,
        visibility = ["//visibility:private"],
    )
    native.cc_library(
        name = name,
        srcs = [":" + archive],
        hdrs = hdrs,
        deps = deps + ["@cuda//:cudart_static"],
        linkstatic = True,
        alwayslink = alwayslink,
        visibility = visibility,
        testonly = testonly,
        tags = tags,
    )
