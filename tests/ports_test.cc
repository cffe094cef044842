// PortReserver against real locks, sockets and a second process (fork). Each test but the last
// reserves under its own lock directory, so concurrently running tests cannot interfere.
#include "tests/ports.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <functional>
#include <random>
#include <set>

#include "gtest/gtest.h"

namespace tessera::testing {
namespace {

// A lock directory of its own, removed afterwards.
class PortsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ports-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    options_.lock_directory = std::string(tmpl) + "/locks";  // made by the reserver
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(std::filesystem::path(options_.lock_directory).parent_path(), ec);
  }

  // Runs `child` in a forked process; returns its exit code (0: its expectations held).
  static int InChild(const std::function<int()>& child) {
    const pid_t pid = fork();
    if (pid == 0) _exit(child());
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  PortReserver::Options options_;
};

// A socket bound to 127.0.0.1:port (not listening), closed on destruction.
class BoundSocket {
 public:
  explicit BoundSocket(int port) : fd_(socket(AF_INET, SOCK_STREAM, 0)) {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    bound_ = bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  }
  ~BoundSocket() { close(fd_); }
  bool bound() const { return bound_; }

 private:
  int fd_;
  bool bound_ = false;
};

TEST_F(PortsTest, ReservedPortsAreDistinctBindableAndOutsideTheEphemeralRange) {
  const PortRange ephemeral = EphemeralPortRange();
  std::printf("ephemeral range %d-%d\n", ephemeral.first, ephemeral.last);
  PortReserver reserver(options_);
  std::set<int> ports;
  for (int i = 0; i < 300; ++i) {
    absl::StatusOr<int> port = reserver.Reserve();
    ASSERT_TRUE(port.ok()) << port.status();
    EXPECT_FALSE(ephemeral.Contains(*port)) << *port;
    EXPECT_TRUE(options_.candidates.Contains(*port)) << *port;
    EXPECT_TRUE(ports.insert(*port).second) << "port " << *port << " handed out twice";
  }
  // Nothing took them meanwhile: each can still be bound.
  for (int port : ports) EXPECT_TRUE(BoundSocket(port).bound()) << port;
}

TEST_F(PortsTest, AHeldPortIsNotHandedOutAgainInThisProcessOrAnother) {
  // 100 consecutive ports, so that the other process can try every one.
  const std::vector<int> all = PortReserver(options_).Candidates();
  const int first = all[std::random_device{}() % (all.size() - 100)];
  options_.candidates = {first, first + 99};
  PortReserver reserver(options_);
  absl::StatusOr<int> held = reserver.Reserve();
  ASSERT_TRUE(held.ok()) << held.status();
  EXPECT_TRUE(absl::IsAlreadyExists(reserver.Reserve(*held))) << *held;
  PortReserver other(options_);  // another reserver in this process: its locks are separate
  EXPECT_TRUE(absl::IsAlreadyExists(other.Reserve(*held))) << *held;

  // Another process asks for that port, then for ports until none is left.
  const int code = InChild([&] {
    PortReserver child(options_);
    if (!absl::IsAlreadyExists(child.Reserve(*held))) return 1;
    int reserved = 0;
    for (absl::StatusOr<int> port = child.Reserve(); port.ok(); port = child.Reserve()) {
      if (*port == *held) return 2;
      ++reserved;
    }
    return reserved > 0 ? 0 : 3;
  });
  EXPECT_EQ(code, 0) << "1: the other process reserved the held port " << *held
                     << " by number; 2: it was handed out; 3: nothing else was (ports "
                     << options_.candidates.first << "-" << options_.candidates.last << ")";
}

TEST_F(PortsTest, AReservationEndsWithItsProcess) {
  int pipe_fds[2];
  ASSERT_EQ(pipe(pipe_fds), 0);
  const int code = InChild([&] {
    PortReserver child(options_);
    absl::StatusOr<int> p = child.Reserve();
    if (!p.ok() || write(pipe_fds[1], &*p, sizeof(*p)) != sizeof(*p)) return 1;
    _exit(0);  // no destructor: the kernel drops the lock with the process
  });
  ASSERT_EQ(code, 0);
  int port = 0;
  ASSERT_EQ(read(pipe_fds[0], &port, sizeof(port)), static_cast<ssize_t>(sizeof(port)));
  close(pipe_fds[0]);
  close(pipe_fds[1]);
  PortReserver reserver(options_);
  EXPECT_TRUE(reserver.Reserve(port).ok()) << port;
}

TEST_F(PortsTest, APortBoundByAProcessThatTookNoLockIsPassedOver) {
  int port = 0;
  {
    PortReserver probe(options_);
    absl::StatusOr<int> p = probe.Reserve();
    ASSERT_TRUE(p.ok()) << p.status();
    port = *p;
  }  // unlocked again
  PortReserver reserver(options_);
  {
    BoundSocket squatter(port);
    ASSERT_TRUE(squatter.bound()) << port;
    EXPECT_TRUE(absl::IsUnavailable(reserver.Reserve(port))) << port;
    PortReserver::Options only = options_;
    only.candidates = {port, port};
    EXPECT_TRUE(absl::IsResourceExhausted(PortReserver(only).Reserve().status())) << port;
  }
  EXPECT_TRUE(reserver.Reserve(port).ok()) << port;  // once the squatter is gone
}

TEST_F(PortsTest, PortsOutsideTheCandidatesAreRefused) {
  options_.ephemeral = {30000, 40000};
  options_.candidates = {29990, 40010};
  PortReserver reserver(options_);
  EXPECT_TRUE(absl::IsInvalidArgument(reserver.Reserve(30000)));
  EXPECT_TRUE(absl::IsInvalidArgument(reserver.Reserve(35000)));
  EXPECT_TRUE(absl::IsInvalidArgument(reserver.Reserve(29989)));
  EXPECT_TRUE(absl::IsInvalidArgument(reserver.Reserve(40011)));
  EXPECT_EQ(reserver.Candidates().size(), 20u);
}

// The process-wide FreePort, under the shared lock directory: the same guarantees.
TEST(FreePortTest, HandsOutDistinctPortsOutsideTheEphemeralRangeThatNoOtherProcessGets) {
  std::set<int> ports;
  for (int i = 0; i < 50; ++i) {
    const int port = FreePort();
    EXPECT_FALSE(EphemeralPortRange().Contains(port)) << port;
    EXPECT_TRUE(ports.insert(port).second) << "port " << port << " handed out twice";
  }
  const pid_t pid = fork();
  if (pid == 0) {
    PortReserver child{PortReserver::Options()};
    for (int port : ports) {
      if (!absl::IsAlreadyExists(child.Reserve(port))) _exit(1);
    }
    _exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "another process could reserve a port FreePort handed out";
}

}  // namespace
}  // namespace tessera::testing
