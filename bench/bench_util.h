// Pieces shared by the benchmarks: random pre-faulted buffers and the plain TCP loopback stream
// that transfer and protection rates are compared with.
#ifndef TESSERA_BENCH_BENCH_UTIL_H_
#define TESSERA_BENCH_BENCH_UTIL_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

namespace tessera {

constexpr size_t kBenchMiB = size_t{1} << 20;

// Prints "<program>: <what>" to stderr and exits 1.
[[noreturn]] void BenchDie(const std::string& what);

struct FreeDeleter {
  void operator()(uint8_t* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<uint8_t, FreeDeleter>;

// 64-byte aligned, rounded up to 64 bytes, every page written (no page fault lands in a timed
// region), random (splitmix64 from `seed`). Exits when memory runs out.
Buffer RandomBuffer(size_t bytes, uint64_t seed);

double SecondsSince(std::chrono::steady_clock::time_point start);

// Sends [src, src + bytes) over a fresh TCP connection on 127.0.0.1 into dst: 4 MiB writes,
// 64 KiB reads, 4 MiB socket buffers (the tuned limit of the network path). Returns the seconds
// from the first write to the last byte read. With `crc`, the stream carries what any checked
// data path must: the sender computes the CRC32C of each chunk_bytes chunk before writing it, the
// receiver reads straight into dst and checks each chunk once it is complete (the ceiling of a
// raw TCP data plane). Exits on a socket error.
double TcpOnce(const uint8_t* src, uint8_t* dst, size_t bytes, bool crc = false,
               size_t chunk_bytes = kBenchMiB);

// The host's TCP counters that tell a round slowed by TCP itself: segments retransmitted
// (/proc/net/snmp Tcp RetransSegs) and segments queued out of order at a receiver
// (/proc/net/netstat TcpExt TCPOFOQueue). Over loopback nothing is lost on a wire, so these count
// reordering between the cores that process a stream's packets and the retransmissions it
// causes. Host-wide: other traffic counts too. Zero where /proc does not say.
struct HostTcpCounters {
  uint64_t retransmitted = 0;
  uint64_t out_of_order = 0;
};
HostTcpCounters ReadHostTcpCounters();

// What the process's threads (those that exited included) cost the kernel: minor page faults
// (fresh memory touched) and involuntary context switches (a thread taken off its core while it
// could run: the cores were oversubscribed). getrusage(RUSAGE_SELF).
struct ProcessCounters {
  uint64_t page_faults = 0;
  uint64_t preempted = 0;
};
ProcessCounters ReadProcessCounters();

}  // namespace tessera

#endif  // TESSERA_BENCH_BENCH_UTIL_H_
