"""Repository rules that wrap the system's packages as Bazel targets, fully offline."""

def _split_flags(flags):
    copts, linkopts = [], []
    for f in flags.split(" "):
        f = f.strip()
        if not f:
            continue
        if f.startswith("-I") or f.startswith("-D") or f.startswith("-pthread"):
            copts.append(f)
        if f.startswith("-l") or f.startswith("-L") or f.startswith("-Wl,") or f.startswith("-pthread"):
            linkopts.append(f)
    return copts, linkopts

def _system_library_impl(ctx):
    result = ctx.execute(["pkg-config", "--cflags", "--libs"] + ctx.attr.modules)
    if result.return_code != 0:
        fail("pkg-config could not find %s: %s\nRun tools/setup.sh to install the system packages." %
             (", ".join(ctx.attr.modules), result.stderr))
    copts, linkopts = _split_flags(result.stdout.strip())
    ctx.file("WORKSPACE", 'workspace(name = "%s")\n' % ctx.name)
    ctx.file("BUILD", """
package(default_visibility = ["//visibility:public"])
cc_library(
    name = "{name}",
    copts = {copts},
    linkopts = {linkopts},
)
""".format(name = ctx.name, copts = repr(copts), linkopts = repr(linkopts)))

system_library = repository_rule(
    implementation = _system_library_impl,
    attrs = {"modules": attr.string_list(mandatory = True)},
    environ = ["PKG_CONFIG_PATH"],
    local = True,
)

def _optional_system_library_impl(ctx):
    found = [d for d in ["/usr/include", "/usr/local/include"] if ctx.path(d + "/" + ctx.attr.header).exists]
    ctx.file("WORKSPACE", 'workspace(name = "%s")\n' % ctx.name)
    ctx.file("BUILD", """
package(default_visibility = ["//visibility:public"])
# {note}
cc_library(
    name = "{name}",
    defines = {defines},
    linkopts = {linkopts},
)
""".format(
        name = ctx.name,
        note = ("found " + found[0] + "/" + ctx.attr.header) if found else ("not found: " + ctx.attr.header),
        defines = repr([ctx.attr.define] if found else []),
        linkopts = repr(["-l" + ctx.attr.library] if found else []),
    ))

# A library used where the system has it: a target that defines `define` and links
# -l`library` when `header` is installed, and is empty otherwise (the code falls back).
optional_system_library = repository_rule(
    implementation = _optional_system_library_impl,
    attrs = {
        "header": attr.string(mandatory = True),
        "library": attr.string(mandatory = True),
        "define": attr.string(mandatory = True),
    },
    local = True,
)

_CUDA_BUILD = """
package(default_visibility = ["//visibility:public"])

cc_library(
    name = "headers",
    hdrs = glob(["include/**"]),
    includes = ["include"],
)

# The CUDA runtime, linked statically so a binary runs wherever a driver is present and
# fails cleanly (cudaErrorNoDevice / InsufficientDriver) where none is.
cc_library(
    name = "cudart_static",
    srcs = ["lib64/libcudart_static.a"],
    linkopts = ["-ldl", "-lrt", "-lpthread"],
    deps = [":headers"],
)

cc_import(
    name = "nccl",
    shared_library = "lib64/libnccl.so.2",
)

filegroup(name = "nvcc", srcs = ["bin/nvcc"])
"""

def _cuda_repository_impl(ctx):
    path = ctx.os.environ.get("TESSERA_CUDA_PATH", "/usr/local/cuda")
    if not ctx.path(path + "/include/cuda_runtime.h").exists:
        fail("CUDA toolkit not found at %s (set TESSERA_CUDA_PATH)" % path)
    for entry in ["include", "lib64", "bin"]:
        ctx.symlink(path + "/" + entry, entry)
    ctx.file("WORKSPACE", 'workspace(name = "cuda")\n')
    ctx.file("BUILD", _CUDA_BUILD)
    ctx.file("path.bzl", 'CUDA_PATH = "%s"\n' % path)

cuda_repository = repository_rule(
    implementation = _cuda_repository_impl,
    environ = ["TESSERA_CUDA_PATH"],
    local = True,
)
