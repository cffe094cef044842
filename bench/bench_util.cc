#include "bench/bench_util.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "common/crc32c.h"

namespace tessera {

void BenchDie(const std::string& what) {
  std::fprintf(stderr, "%s: %s\n", program_invocation_short_name, what.c_str());
  std::exit(1);
}

Buffer RandomBuffer(size_t bytes, uint64_t seed) {
  const size_t rounded = (bytes + 63) / 64 * 64;
  Buffer buffer(static_cast<uint8_t*>(std::aligned_alloc(64, rounded)));
  if (buffer == nullptr) BenchDie("cannot allocate " + std::to_string(rounded) + " bytes");
  uint64_t state = seed;
  for (size_t x = 0; x < rounded; x += 8) {
    state += 0x9E3779B97F4A7C15ull;  // splitmix64
    uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    std::memcpy(buffer.get() + x, &z, 8);
  }
  return buffer;
}

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

namespace {

// The value under `name` in the "<prefix>: name name ..." / "<prefix>: value value ..." line pairs
// of a /proc/net file; 0 when absent.
uint64_t ProcNetCounter(const char* file, const std::string& prefix, const std::string& name) {
  std::ifstream in(file);
  std::string header;
  std::string values;
  while (std::getline(in, header) && std::getline(in, values)) {
    if (header.compare(0, prefix.size() + 1, prefix + ":") != 0) continue;
    std::istringstream names(header);
    std::istringstream numbers(values);
    std::string n;
    std::string v;
    while (names >> n && numbers >> v) {
      if (n == name) return std::strtoull(v.c_str(), nullptr, 10);
    }
  }
  return 0;
}

void SetBuffers(int fd, int bytes) {
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes));
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes));
}

}  // namespace

HostTcpCounters ReadHostTcpCounters() {
  HostTcpCounters c;
  c.retransmitted = ProcNetCounter("/proc/net/snmp", "Tcp", "RetransSegs");
  c.out_of_order = ProcNetCounter("/proc/net/netstat", "TcpExt", "TCPOFOQueue");
  return c;
}

ProcessCounters ReadProcessCounters() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return {static_cast<uint64_t>(usage.ru_minflt), static_cast<uint64_t>(usage.ru_nivcsw)};
}

double TcpOnce(const uint8_t* src, uint8_t* dst, size_t bytes, bool crc, size_t chunk_bytes) {
  constexpr int kSocketBuffer = 4 << 20;
  constexpr size_t kWriteBytes = 4 * kBenchMiB;
  constexpr size_t kReadBytes = 64 << 10;
  const int listener = socket(AF_INET, SOCK_STREAM, 0);
  SetBuffers(listener, kSocketBuffer);  // inherited by the accepted socket, before the handshake
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      listen(listener, 1) != 0) {
    BenchDie("tcp: bind/listen failed");
  }
  socklen_t len = sizeof(addr);
  getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len);
  const int sender = socket(AF_INET, SOCK_STREAM, 0);
  SetBuffers(sender, kSocketBuffer);
  if (connect(sender, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    BenchDie("tcp: connect failed");
  }
  const int receiver = accept(listener, nullptr, nullptr);
  close(listener);
  std::atomic<bool> go{false};
  uint32_t received_crc_sum = 0;
  std::thread reader([&] {
    while (!go.load()) {
    }
    size_t got = 0;
    size_t checked = 0;
    uint32_t crc_sum = 0;
    while (got < bytes) {
      const ssize_t n = read(receiver, dst + got, std::min(kReadBytes, bytes - got));
      if (n <= 0) BenchDie("tcp: read failed");
      got += static_cast<size_t>(n);
      for (; crc && (got - checked >= chunk_bytes || got == bytes) && checked < got;) {
        const size_t len = std::min(chunk_bytes, got - checked);
        crc_sum ^= Crc32c(dst + checked, len);
        checked += len;
      }
    }
    if (crc) received_crc_sum = crc_sum;
  });
  const auto start = std::chrono::steady_clock::now();
  go.store(true);
  uint32_t sent_crc_sum = 0;
  const size_t write_bytes = crc ? chunk_bytes : kWriteBytes;
  for (size_t sent = 0; sent < bytes;) {
    const size_t len = std::min(write_bytes, bytes - sent);
    if (crc) sent_crc_sum ^= Crc32c(src + sent, len);
    for (size_t done = 0; done < len;) {
      const ssize_t n = write(sender, src + sent + done, len - done);
      if (n <= 0) BenchDie("tcp: write failed");
      done += static_cast<size_t>(n);
    }
    sent += len;
  }
  reader.join();
  if (crc && sent_crc_sum != received_crc_sum) BenchDie("tcp+crc: chunk CRCs differ");
  const double seconds = SecondsSince(start);
  close(sender);
  close(receiver);
  return seconds;
}

}  // namespace tessera
