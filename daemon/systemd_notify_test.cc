#include "daemon/systemd_notify.h"

#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

using ::testing::HasSubstr;

// A name no other test run on this machine uses (sandboxed runs may share /tmp and pids).
std::string UniqueName(const std::string& prefix) {
  static const uint64_t nonce = std::random_device{}();
  static int counter = 0;
  return absl::StrCat(prefix, getpid(), "-", nonce % 1000000007, "-", counter++);
}

// A Unix datagram socket standing in for systemd's notification socket.
class FakeSystemd {
 public:
  FakeSystemd() {
    // Socket paths must be short: under /tmp.
    path_ = UniqueName("/tmp/tessera-notify-") + ".sock";
    unlink(path_.c_str());
    fd_ = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path_.c_str(), sizeof(addr.sun_path) - 1);
    EXPECT_EQ(bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0)
        << std::strerror(errno);
  }
  ~FakeSystemd() {
    close(fd_);
    unlink(path_.c_str());
  }
  const std::string& path() const { return path_; }

  // The next message, or "" after `timeout`.
  std::string Receive(absl::Duration timeout) {
    timeval tv{};
    tv.tv_sec = absl::ToInt64Seconds(timeout);
    tv.tv_usec = absl::ToInt64Microseconds(timeout) % 1000000;
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    char buffer[4096];
    ssize_t n = recv(fd_, buffer, sizeof(buffer), 0);
    return n > 0 ? std::string(buffer, n) : "";
  }
  // Messages until one contains `what` (returned), or "" after `timeout`.
  std::string ReceiveUntil(const std::string& what, absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    while (absl::Now() < deadline) {
      std::string m = Receive(deadline - absl::Now());
      if (m.find(what) != std::string::npos) return m;
    }
    return "";
  }

 private:
  std::string path_;
  int fd_ = -1;
};

TEST(SystemdNotifyTest, WithoutNotifySocketDoesNothing) {
  unsetenv("NOTIFY_SOCKET");
  SystemdNotifier notifier;
  EXPECT_FALSE(notifier.enabled());
  notifier.Ready("x");  // must not crash or block
  notifier.MaybePingWatchdog();
}

TEST(SystemdNotifyTest, ReadyStatusWatchdogAndStopping) {
  FakeSystemd systemd;
  setenv("NOTIFY_SOCKET", systemd.path().c_str(), 1);
  setenv("WATCHDOG_USEC", "200000", 1);
  setenv("WATCHDOG_PID", std::to_string(getpid()).c_str(), 1);
  SystemdNotifier notifier;
  ASSERT_TRUE(notifier.enabled());
  EXPECT_EQ(notifier.watchdog_interval(), absl::Milliseconds(200));

  notifier.Ready("serving");
  std::string m = systemd.Receive(absl::Seconds(2));
  EXPECT_THAT(m, HasSubstr("READY=1"));
  EXPECT_THAT(m, HasSubstr("STATUS=serving"));
  notifier.MaybePingWatchdog();  // too early: nothing
  EXPECT_EQ(systemd.Receive(absl::Milliseconds(20)), "");
  absl::SleepFor(absl::Milliseconds(110));  // past half the interval
  notifier.MaybePingWatchdog();
  EXPECT_EQ(systemd.Receive(absl::Seconds(1)), "WATCHDOG=1");
  notifier.Stopping("draining");
  EXPECT_THAT(systemd.Receive(absl::Seconds(1)), HasSubstr("STOPPING=1"));
  unsetenv("NOTIFY_SOCKET");
  unsetenv("WATCHDOG_USEC");
  unsetenv("WATCHDOG_PID");
}

// A real tesserad started the way systemd starts a Type=notify unit: READY=1 comes once its
// agent socket accepts connections, watchdog pings follow, and SIGTERM brings STOPPING=1 and a
// clean exit.
TEST(SystemdNotifyTest, TesseradSignalsReadyWatchdogAndStopping) {
  FakeSystemd systemd;
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  ASSERT_NE(srcdir, nullptr);
  const std::string binary =
      absl::StrCat(srcdir, "/", workspace != nullptr ? workspace : "tessera", "/daemon/tesserad");
  const std::string socket_path = UniqueName("/tmp/tessera-sd-") + ".sock";
  const std::string store = UniqueName("/dev/shm/tessera-sd-test-");
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    setenv("NOTIFY_SOCKET", systemd.path().c_str(), 1);
    setenv("WATCHDOG_USEC", "400000", 1);
    setenv("WATCHDOG_PID", std::to_string(getpid()).c_str(), 1);
    std::vector<std::string> args = {binary,
                                     "--set",
                                     "node.id=sd",
                                     "--set",
                                     "store.directory=" + store,
                                     "--set",
                                     "store.capacity_bytes=64MiB",
                                     "--set",
                                     "agent.socket_path=" + socket_path,
                                     "--set",
                                     "daemon.drain_timeout_ms=1000"};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(binary.c_str(), argv.data());
    _exit(127);
  }
  const std::string ready = systemd.ReceiveUntil("READY=1", absl::Seconds(30));
  EXPECT_THAT(ready, HasSubstr("STATUS=serving as node sd"));
  if (!ready.empty()) {
    // Ready means serving: the agent socket accepts a connection now.
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, socket_path.c_str(), sizeof(addr.sun_path) - 1);
    EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0)
        << std::strerror(errno);
    close(fd);
    EXPECT_EQ(systemd.ReceiveUntil("WATCHDOG=1", absl::Seconds(2)), "WATCHDOG=1");
  }
  kill(pid, SIGTERM);
  EXPECT_THAT(systemd.ReceiveUntil("STOPPING=1", absl::Seconds(10)), HasSubstr("STOPPING=1"));
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "status " << status;
  std::system(("rm -rf " + store).c_str());
}

}  // namespace
}  // namespace tessera
