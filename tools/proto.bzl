"""gRPC + protobuf C++ code generation with the system's protoc and grpc_cpp_plugin.

All protos of a package are compiled in one protoc run, so protos that import each other
share a single generated copy of every .pb.h.
"""

def grpc_cc_library(name, srcs, deps = [], visibility = None):
    bases = [s[:-len(".proto")] for s in srcs]
    pkg = native.package_name()
    outs = []
    for b in bases:
        outs += [b + ".pb.h", b + ".pb.cc", b + ".grpc.pb.h", b + ".grpc.pb.cc"]
    native.genrule(
        name = name + "_gen",
        srcs = srcs,
        outs = outs,
        cmd = ("/usr/bin/protoc -I. --cpp_out=$(GENDIR) --grpc_out=$(GENDIR) " +
               "--plugin=protoc-gen-grpc=/usr/bin/grpc_cpp_plugin " +
               " ".join([pkg + "/" + s for s in srcs])),
    )
    native.cc_library(
        name = name,
        srcs = [o for o in outs if o.endswith(".cc")],
        hdrs = [o for o in outs if o.endswith(".h")],
        deps = deps + ["@grpc"],
        visibility = visibility,
    )
