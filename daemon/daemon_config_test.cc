#include "daemon/daemon_config.h"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/logging.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

std::string WriteTempFile(const std::string& name, const std::string& contents) {
  const char* dir = std::getenv("TEST_TMPDIR");
  std::string path = absl::StrCat(dir != nullptr ? dir : "/tmp", "/", name);
  std::FILE* file = std::fopen(path.c_str(), "wb");
  EXPECT_NE(file, nullptr) << path;
  std::fwrite(contents.data(), 1, contents.size(), file);
  std::fclose(file);
  return path;
}

void ExpectSameConfig(const DaemonConfig& a, const DaemonConfig& b) {
  EXPECT_EQ(a.node.id, b.node.id);
  EXPECT_EQ(a.store.directory, b.store.directory);
  EXPECT_EQ(a.store.capacity_bytes, b.store.capacity_bytes);
  EXPECT_EQ(a.store.prefault, b.store.prefault);
  EXPECT_EQ(a.store.crc_threads, b.store.crc_threads);
  EXPECT_EQ(a.store.seal_checksum, b.store.seal_checksum);
  EXPECT_EQ(a.agent.socket_path, b.agent.socket_path);
  EXPECT_EQ(a.agent.socket_mode, b.agent.socket_mode);
  EXPECT_EQ(a.daemon.drain_timeout_ms, b.daemon.drain_timeout_ms);
  EXPECT_EQ(a.log.level, b.log.level);
}

// The message of a failed load from overrides alone.
std::string OverrideError(const std::string& override_text) {
  absl::StatusOr<DaemonConfig> config = LoadDaemonConfig("", {override_text});
  if (config.ok()) return "(loaded)";
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument) << config.status();
  return std::string(config.status().message());
}

// Where FileError writes its file.
std::string ErrorFilePath() {
  const char* dir = std::getenv("TEST_TMPDIR");
  return absl::StrCat(dir != nullptr ? dir : "/tmp", "/error.toml");
}

// The message of a failed load of a file (at ErrorFilePath()) holding `toml`.
std::string FileError(const std::string& toml) {
  std::string path = WriteTempFile("error.toml", toml);
  EXPECT_EQ(path, ErrorFilePath());
  absl::StatusOr<DaemonConfig> config = LoadDaemonConfig(path, {});
  if (config.ok()) return "(loaded)";
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument) << config.status();
  return std::string(config.status().message());
}

TEST(DaemonConfigTest, NoFileNoOverridesGivesTheDocumentedDefaults) {
  absl::StatusOr<DaemonConfig> config = LoadDaemonConfig("", {});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->node.id, "");
  EXPECT_EQ(config->store.directory, "/dev/shm/tessera");
  EXPECT_EQ(config->store.capacity_bytes, 0);
  EXPECT_TRUE(config->store.prefault);
  EXPECT_EQ(config->store.crc_threads, 4);
  EXPECT_EQ(config->agent.socket_path, "/run/tessera/agent.sock");
  EXPECT_EQ(config->agent.socket_mode, 0660u);
  EXPECT_EQ(config->daemon.drain_timeout_ms, 30000);
  EXPECT_EQ(config->log.level, "info");
  ExpectSameConfig(*config, DaemonConfig{});
}

TEST(DaemonConfigTest, DefaultTomlLoadsBackToTheDefaults) {
  std::string toml = DefaultDaemonConfigToml();
  std::string path = WriteTempFile("default.toml", toml);
  absl::StatusOr<DaemonConfig> config = LoadDaemonConfig(path, {});
  ASSERT_TRUE(config.ok()) << config.status() << "\n" << toml;
  ExpectSameConfig(*config, DaemonConfig{});
}

TEST(DaemonConfigTest, DefaultTomlDocumentsEveryKey) {
  std::string toml = DefaultDaemonConfigToml();
  EXPECT_THAT(toml, StartsWith("# tesserad configuration."));
  for (const char* table : {"[node]", "[store]", "[agent]", "[daemon]", "[log]"}) {
    EXPECT_THAT(toml, HasSubstr(absl::StrCat("\n", table, "\n"))) << table;
  }
  for (const char* line :
       {"id = \"\"", "directory = \"/dev/shm/tessera\"", "capacity_bytes = 0", "prefault = true",
        "crc_threads = 4", "socket_path = \"/run/tessera/agent.sock\"", "socket_mode = \"0660\"",
        "drain_timeout_ms = 30000", "level = \"info\""}) {
    // Each key follows its doc: a paragraph of comments, then a "# Type: ..." paragraph.
    size_t at = toml.find(absl::StrCat("\n", line, "\n"));
    ASSERT_NE(at, std::string::npos) << line;
    size_t type_line = toml.rfind("\n# Type: ", at);
    size_t blank_line = toml.rfind("\n\n", at);
    ASSERT_NE(type_line, std::string::npos) << line;
    ASSERT_NE(blank_line, std::string::npos) << line;
    EXPECT_LT(blank_line + 2, type_line) << line;  // a doc line between the blank and the type
    for (size_t i = blank_line + 2; i < at; i = toml.find('\n', i) + 1) {
      EXPECT_EQ(toml[i], '#') << line;
    }
  }
  EXPECT_THAT(toml, HasSubstr("0 means half of the space free on the filesystem of"));
  EXPECT_THAT(toml, HasSubstr("Empty means the host name."));
  EXPECT_THAT(toml, HasSubstr("# Type: integer; valid: 1 to 64\ncrc_threads = 4\n"));
  for (absl::string_view line : absl::StrSplit(toml, '\n')) EXPECT_LE(line.size(), 100u) << line;
}

TEST(DaemonConfigTest, OverridesWinOverTheFile) {
  std::string path = WriteTempFile("precedence.toml", R"(
[node]
id = "node-07.rack2"
[store]
directory = "/mnt/huge/tessera"
capacity_bytes = "512GiB"
crc_threads = 8
prefault = false
[agent]
socket_mode = "0600"
[daemon]
drain_timeout_ms = 5000
)");
  absl::StatusOr<DaemonConfig> config = LoadDaemonConfig(
      path, {"store.crc_threads=16", "log.level=debug", "store.capacity_bytes=64GiB",
             "agent.socket_path=/tmp/t.sock", "store.state_directory=/var/lib/tessera"});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->node.id, "node-07.rack2");                 // file
  EXPECT_EQ(config->store.directory, "/mnt/huge/tessera");     // file
  EXPECT_EQ(config->store.capacity_bytes, int64_t{64} << 30);  // override over file
  EXPECT_EQ(config->store.crc_threads, 16);                    // override over file
  EXPECT_FALSE(config->store.prefault);                        // file
  EXPECT_EQ(config->agent.socket_path, "/tmp/t.sock");         // override over default
  EXPECT_EQ(config->store.state_directory, "/var/lib/tessera");  // override over default
  EXPECT_EQ(config->agent.socket_mode, 0600u);                 // file
  EXPECT_EQ(config->daemon.drain_timeout_ms, 5000);            // file
  EXPECT_EQ(config->log.level, "debug");                       // override over default
}

TEST(DaemonConfigTest, ByteSizes) {
  auto capacity = [](const std::string& value) -> absl::StatusOr<int64_t> {
    absl::StatusOr<DaemonConfig> config =
        LoadDaemonConfig("", {absl::StrCat("store.capacity_bytes=", value)});
    if (!config.ok()) return config.status();
    return config->store.capacity_bytes;
  };
  EXPECT_EQ(*capacity("1KiB"), 1024);
  EXPECT_EQ(*capacity("1KB"), 1000);
  EXPECT_EQ(*capacity("0"), 0);
  EXPECT_EQ(*capacity("4096"), 4096);
  EXPECT_EQ(*capacity("\"64GiB\""), int64_t{64} << 30);
  EXPECT_EQ(*capacity("1.5TB"), int64_t{1500000000000});
  EXPECT_EQ(*capacity("2 tib"), int64_t{2} << 40);
  for (const char* bad : {"-1", "-1KiB", "garbage", "64Gigs", "1.5", "", "99999999PiB", "true"}) {
    absl::StatusOr<int64_t> bytes = capacity(bad);
    EXPECT_EQ(bytes.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(bytes.status().message(),
                HasSubstr("store.capacity_bytes: expected a byte size such as 68719476736 or "
                          "\"64GiB\", got "))
        << bad;
  }

  const std::string path = ErrorFilePath();
  EXPECT_EQ(FileError("[store]\ncapacity_bytes = 68719476736\n"), "(loaded)");
  EXPECT_EQ(FileError("[store]\ncapacity_bytes = \"1KiB\"\n"), "(loaded)");
  EXPECT_EQ(FileError("[store]\ncapacity_bytes = -5\n"),
            path +
                ":2:18: store.capacity_bytes: expected a byte size such as 68719476736 or "
                "\"64GiB\", got -5 (a size cannot be negative)");
  EXPECT_EQ(FileError("[store]\ncapacity_bytes = \"lots\"\n"),
            path +
                ":2:18: store.capacity_bytes: expected a byte size such as 68719476736 or "
                "\"64GiB\", got \"lots\" (expected a number of bytes followed by an optional "
                "unit (B, KB, MB, GB, TB, PB, KiB, MiB, GiB, TiB, PiB))");
}

TEST(DaemonConfigErrorTest, WrongTypeNamesFileKeyAndExpectation) {
  const std::string path = ErrorFilePath();
  EXPECT_EQ(FileError("[store]\ncapacity_bytes = true\n"),
            path +
                ":2:18: store.capacity_bytes: expected a byte size such as 68719476736 or "
                "\"64GiB\", got true");
  EXPECT_EQ(FileError("[store]\nprefault = \"yes\"\n"),
            path + ":2:12: store.prefault: expected true or false, got \"yes\"");
  EXPECT_EQ(FileError("[agent]\nsocket_mode = 660\n"),
            path + ":2:15: agent.socket_mode: expected a string, got 660");
  EXPECT_EQ(OverrideError("daemon.drain_timeout_ms=30s"),
            "override \"daemon.drain_timeout_ms=30s\": daemon.drain_timeout_ms: expected an "
            "integer, got 30s");
}

TEST(DaemonConfigErrorTest, UnknownKeySuggestsTheClosest) {
  const std::string path = ErrorFilePath();
  EXPECT_EQ(FileError("[store]\ncapacity = \"64GiB\"\n"),
            path +
                ":2:1: unknown key \"store.capacity\" (did you mean "
                "\"store.capacity_bytes\"?)");
  EXPECT_EQ(FileError("[daemon]\ndrain_timeout = 5\n"),
            path +
                ":2:1: unknown key \"daemon.drain_timeout\" (did you mean "
                "\"daemon.drain_timeout_ms\"?)");
  EXPECT_EQ(OverrideError("agent.socket=/x"),
            "override \"agent.socket=/x\": unknown key \"agent.socket\" (did you mean "
            "\"agent.socket_path\"?)");
  EXPECT_EQ(OverrideError("crc_threads=2"),
            "override \"crc_threads=2\": unknown key \"crc_threads\" (did you mean "
            "\"store.crc_threads\"?)");
  EXPECT_EQ(OverrideError("membership.peers=a"),
            "override \"membership.peers=a\": unknown key \"membership.peers\"");
}

TEST(DaemonConfigErrorTest, OutOfRange) {
  EXPECT_EQ(OverrideError("store.crc_threads=0"),
            "override \"store.crc_threads=0\": store.crc_threads: must be 1 to 64, got 0");
  EXPECT_EQ(OverrideError("store.crc_threads=65"),
            "override \"store.crc_threads=65\": store.crc_threads: must be 1 to 64, got 65");
  EXPECT_EQ(OverrideError("daemon.drain_timeout_ms=-1"),
            "override \"daemon.drain_timeout_ms=-1\": daemon.drain_timeout_ms: must be 0 to "
            "3600000, got -1");
  EXPECT_EQ(OverrideError("store.crc_threads=64"), "(loaded)");
  EXPECT_EQ(OverrideError("daemon.drain_timeout_ms=0"), "(loaded)");
}

TEST(DaemonConfigErrorTest, MalformedOverride) {
  EXPECT_EQ(OverrideError("store.crc_threads"),
            "override \"store.crc_threads\": expected key=value, such as "
            "store.directory=/dev/shm/tessera");
}

TEST(DaemonConfigErrorTest, SyntaxErrorHasLineAndColumn) {
  const std::string path = ErrorFilePath();
  std::string message = FileError("[store]\ncrc_threads = 4\n[agent\n");
  EXPECT_THAT(message, StartsWith(path + ":3:"));
  EXPECT_THAT(message, HasSubstr(": TOML syntax error: "));
}

TEST(DaemonConfigErrorTest, MissingFileIsNotFoundAndNamed) {
  absl::StatusOr<DaemonConfig> config = LoadDaemonConfig("/nonexistent/tesserad.toml", {});
  EXPECT_EQ(config.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(config.status().message(), HasSubstr("/nonexistent/tesserad.toml"));
}

TEST(DaemonConfigErrorTest, NodeId) {
  EXPECT_EQ(OverrideError("node.id=host-1.example_A"), "(loaded)");
  EXPECT_EQ(OverrideError("node.id=" + std::string(64, 'n')), "(loaded)");
  const std::string valid =
      "must be empty (the host name) or 1 to 64 characters from A-Z a-z 0-9 . _ - other than "
      "\".\" and \"..\"; got ";
  EXPECT_EQ(OverrideError("node.id=a/b"),
            "override \"node.id=a/b\": node.id: " + valid + "\"a/b\"");
  EXPECT_EQ(OverrideError("node.id=.."), "override \"node.id=..\": node.id: " + valid + "\"..\"");
  EXPECT_EQ(OverrideError("node.id=."), "override \"node.id=.\": node.id: " + valid + "\".\"");
  EXPECT_THAT(OverrideError("node.id=" + std::string(65, 'n')), HasSubstr(valid));
  EXPECT_THAT(OverrideError("node.id=has space"), HasSubstr(valid + "\"has space\""));
}

TEST(DaemonConfigErrorTest, Paths) {
  EXPECT_EQ(OverrideError("store.directory=relative/dir"),
            "override \"store.directory=relative/dir\": store.directory: must be an absolute "
            "path; got \"relative/dir\"");
  EXPECT_EQ(OverrideError("store.state_directory=var/lib/tessera"),
            "override \"store.state_directory=var/lib/tessera\": store.state_directory: must be "
            "an absolute path; got \"var/lib/tessera\"");
  EXPECT_EQ(OverrideError("store.state_directory="), "(loaded)");  // beside the segments
  EXPECT_EQ(OverrideError("agent.socket_path=agent.sock"),
            "override \"agent.socket_path=agent.sock\": agent.socket_path: must be an absolute "
            "path; got \"agent.sock\"");
  std::string longest = "/" + std::string(106, 's');
  EXPECT_EQ(OverrideError("agent.socket_path=" + longest), "(loaded)");
  EXPECT_EQ(OverrideError("agent.socket_path=" + longest + "s"),
            absl::StrCat("override \"agent.socket_path=", longest,
                         "s\": agent.socket_path: must be at most 107 bytes long (the limit of a "
                         "Unix socket address); got 108 bytes"));
}

TEST(DaemonConfigErrorTest, SocketMode) {
  absl::StatusOr<DaemonConfig> config = LoadDaemonConfig("", {"agent.socket_mode=755"});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->agent.socket_mode, 0755u);
  config = LoadDaemonConfig("", {"agent.socket_mode=0600"});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->agent.socket_mode, 0600u);
  for (const char* bad : {"0999", "rw-rw----", "66", "06600", "+660"}) {
    EXPECT_EQ(OverrideError(absl::StrCat("agent.socket_mode=", bad)),
              absl::StrCat("override \"agent.socket_mode=", bad,
                           "\": agent.socket_mode: must be 3 or 4 octal digits such as \"0660\"; "
                           "got \"",
                           bad, "\""));
  }
}

TEST(DaemonConfigErrorTest, LogLevel) {
  EXPECT_EQ(OverrideError("log.level=verbose"),
            "override \"log.level=verbose\": log.level: must be one of trace, debug, info, warn, "
            "error, critical, off; got \"verbose\"");
  // The accepted levels are exactly those tessera::SetLogLevel accepts.
  for (const char* level : {"trace", "debug", "info", "warn", "error", "critical", "off"}) {
    EXPECT_EQ(OverrideError(absl::StrCat("log.level=", level)), "(loaded)") << level;
    EXPECT_TRUE(SetLogLevel(level).ok()) << level;
  }
  EXPECT_TRUE(SetLogLevel("info").ok());
}

TEST(DaemonConfigErrorTest, EveryProblemIsReported) {
  std::string path = WriteTempFile("many.toml", "[store]\ncrc_threads = 0\nprefault = 2\n");
  absl::StatusOr<DaemonConfig> config = LoadDaemonConfig(path, {"log.level=loud", "oops"});
  ASSERT_FALSE(config.ok());
  std::vector<std::string> lines = absl::StrSplit(config.status().message(), '\n');
  ASSERT_EQ(lines.size(), 4u) << config.status();
  EXPECT_THAT(lines[0], StartsWith(path + ":2:15: store.crc_threads: must be 1 to 64"));
  EXPECT_THAT(lines[1], StartsWith(path + ":3:12: store.prefault: expected true or false"));
  EXPECT_THAT(lines[2], StartsWith("override \"log.level=loud\": log.level: must be one of"));
  EXPECT_THAT(lines[3], StartsWith("override \"oops\": expected key=value"));
}

TEST(DaemonConfigTest, ClusterKeys) {
  absl::StatusOr<DaemonConfig> defaults = LoadDaemonConfig("", {});
  ASSERT_TRUE(defaults.ok()) << defaults.status();
  EXPECT_EQ(defaults->peer.listen_address, "");
  EXPECT_EQ(defaults->ec.k, 3);
  EXPECT_EQ(defaults->ec.m, 2);
  EXPECT_EQ(defaults->liveness.heartbeat_ms, 1000);
  EXPECT_EQ(defaults->liveness.timeout_ms, 3000);
  EXPECT_EQ(defaults->liveness.indirect_probes, 3);
  EXPECT_EQ(defaults->liveness.suspicion_mult, 4);
  EXPECT_EQ(defaults->peer.data_path, "tcp");
  EXPECT_EQ(defaults->peer.data_port, 0);
  EXPECT_EQ(defaults->liveness.transport, "udp");
  EXPECT_EQ(defaults->store.filesystem_check, "refuse");
  EXPECT_EQ(defaults->store.seal_checksum, "client");
  absl::StatusOr<DaemonConfig> config = LoadDaemonConfig(
      "", {"peer.listen_address=127.0.0.1:7070", "cluster.members=127.0.0.1:7070,h2:7071",
           "ec.k=2", "ec.m=1", "liveness.heartbeat_ms=100", "liveness.timeout_ms=400",
           "liveness.indirect_probes=0", "liveness.suspicion_mult=9", "peer.data_path=grpc",
           "peer.data_port=7171", "liveness.transport=grpc", "store.filesystem_check=warn",
           "cluster.insecure=true", "store.seal_checksum=daemon"});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->PeerAddress(), "127.0.0.1:7070");
  EXPECT_EQ(config->cluster.members, (std::vector<std::string>{"127.0.0.1:7070", "h2:7071"}));
  EXPECT_EQ(config->ec.k, 2);
  EXPECT_EQ(config->ec.m, 1);
  EXPECT_EQ(config->liveness.timeout_ms, 400);
  EXPECT_EQ(config->liveness.indirect_probes, 0);
  EXPECT_EQ(config->liveness.suspicion_mult, 9);
  EXPECT_EQ(config->peer.data_path, "grpc");
  EXPECT_EQ(config->peer.data_port, 7171);
  EXPECT_EQ(config->liveness.transport, "grpc");
  EXPECT_EQ(config->store.filesystem_check, "warn");
  EXPECT_EQ(config->store.seal_checksum, "daemon");
}

TEST(DaemonConfigTest, VerificationBudgets) {
  absl::StatusOr<DaemonConfig> defaults = LoadDaemonConfig("", {});
  ASSERT_TRUE(defaults.ok()) << defaults.status();
  EXPECT_EQ(defaults->cluster.datagram_failures_per_source_per_s, 10);
  EXPECT_EQ(defaults->cluster.datagram_failures_per_s, 100);
  EXPECT_EQ(defaults->cluster.proof_checks_per_member_per_s, 100);
  EXPECT_EQ(defaults->cluster.proof_checks_per_s, 500);
  const std::string toml = DefaultDaemonConfigToml();
  for (const char* line : {"datagram_failures_per_source_per_s = 10", "datagram_failures_per_s = 100",
                           "proof_checks_per_member_per_s = 100", "proof_checks_per_s = 500"}) {
    EXPECT_THAT(toml, HasSubstr(absl::StrCat("\n", line, "\n"))) << line;
  }
  // From a file and from overrides, at the bounds and between.
  const std::string path = WriteTempFile("budgets.toml", R"(
[cluster]
datagram_failures_per_source_per_s = 1
datagram_failures_per_s = 1000000
proof_checks_per_member_per_s = 100000
proof_checks_per_s = 1
)");
  absl::StatusOr<DaemonConfig> config = LoadDaemonConfig(path, {"cluster.proof_checks_per_s=250"});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->cluster.datagram_failures_per_source_per_s, 1);
  EXPECT_EQ(config->cluster.datagram_failures_per_s, 1000000);
  EXPECT_EQ(config->cluster.proof_checks_per_member_per_s, 100000);
  EXPECT_EQ(config->cluster.proof_checks_per_s, 250);
}

TEST(DaemonConfigTest, CipherThreads) {
  absl::StatusOr<DaemonConfig> defaults = LoadDaemonConfig("", {});
  ASSERT_TRUE(defaults.ok()) << defaults.status();
  EXPECT_EQ(defaults->cluster.tls_cipher_threads, 8);
  EXPECT_THAT(DefaultDaemonConfigToml(), HasSubstr("\ntls_cipher_threads = 8\n"));
  const std::string path = WriteTempFile("cipher.toml", "[cluster]\ntls_cipher_threads = 64\n");
  absl::StatusOr<DaemonConfig> config = LoadDaemonConfig(path, {});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->cluster.tls_cipher_threads, 64);
  config = LoadDaemonConfig(path, {"cluster.tls_cipher_threads=1"});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->cluster.tls_cipher_threads, 1);
  EXPECT_EQ(defaults->cluster.tls_cipher_nice, 5);
  EXPECT_THAT(DefaultDaemonConfigToml(), HasSubstr("\ntls_cipher_nice = 5\n"));
  config = LoadDaemonConfig(path, {"cluster.tls_cipher_nice=0"});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->cluster.tls_cipher_nice, 0);
  config = LoadDaemonConfig(WriteTempFile("nice.toml", "[cluster]\ntls_cipher_nice = 19\n"), {});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->cluster.tls_cipher_nice, 19);
  EXPECT_EQ(defaults->cluster.tls_cipher_library, "auto");
  EXPECT_THAT(DefaultDaemonConfigToml(), HasSubstr("\ntls_cipher_library = \"auto\"\n"));
  for (const char* library : {"openssl", "ipsec-mb"}) {
    config = LoadDaemonConfig(
        WriteTempFile("library.toml",
                      std::string("[cluster]\ntls_cipher_library = \"") + library + "\"\n"),
        {});
    ASSERT_TRUE(config.ok()) << config.status();
    EXPECT_EQ(config->cluster.tls_cipher_library, library);
  }
}

// What the daemon builds its throttles from: a budget set in the file reaches the throttle.
TEST(DaemonConfigTest, VerificationBudgetsReachTheThrottles) {
  const std::string path = WriteTempFile("low-budgets.toml", R"(
[cluster]
datagram_failures_per_source_per_s = 2
datagram_failures_per_s = 3
)");
  absl::StatusOr<DaemonConfig> config = LoadDaemonConfig(path, {"cluster.proof_checks_per_s=5"});
  ASSERT_TRUE(config.ok()) << config.status();
  // Failures admitted in `seconds` after each burst is spent, from one source and from made-up
  // ones, by a throttle built as the daemon builds it.
  auto admitted_after_burst = [](VerificationThrottle::Options options, bool one_source,
                                 int seconds) {
    VerificationThrottle throttle(options);
    absl::Time now = absl::FromUnixSeconds(1'000'000);
    int source = 0;
    auto fail_all = [&] {
      int admitted = 0;
      for (int i = 0; i < 10'000; ++i) {
        const std::string from = one_source ? "10.0.0.1" : absl::StrCat("10.1.", source++);
        if (!throttle.Admit(from, now)) continue;
        throttle.Failed(from, now);
        ++admitted;
      }
      return admitted;
    };
    fail_all();  // the bursts
    now += absl::Seconds(seconds);
    return fail_all();
  };
  const VerificationThrottle::Options datagrams = DatagramThrottleOptions(config->cluster);
  EXPECT_EQ(admitted_after_burst(datagrams, /*one_source=*/true, 5), 10) << "2 a second";
  EXPECT_EQ(admitted_after_burst(datagrams, /*one_source=*/false, 5), 15) << "3 a second";
  // The defaults, for contrast: 10 and 100 a second, each within its burst.
  const VerificationThrottle::Options defaults = DatagramThrottleOptions(DaemonConfig().cluster);
  EXPECT_EQ(admitted_after_burst(defaults, /*one_source=*/true, 1), 10);
  EXPECT_EQ(admitted_after_burst(defaults, /*one_source=*/false, 1), 64);
  // Proofs: the override's 5 a second in all, over IncarnationProofs' bursts.
  VerificationThrottle::Options base;
  base.total_burst = 256;
  const VerificationThrottle::Options proofs = ProofThrottleOptions(config->cluster, base);
  EXPECT_EQ(proofs.total_burst, 256);
  EXPECT_EQ(admitted_after_burst(proofs, /*one_source=*/false, 4), 20);
  EXPECT_EQ(proofs.source_interval, absl::Milliseconds(10)) << "the default 100 a second";
}

TEST(DaemonConfigErrorTest, VerificationBudgets) {
  // Each names the key, the value and the range; 0 (no check at all) is refused, not unlimited.
  EXPECT_EQ(OverrideError("cluster.datagram_failures_per_source_per_s=0"),
            "override \"cluster.datagram_failures_per_source_per_s=0\": "
            "cluster.datagram_failures_per_source_per_s: must be 1 to 100000, got 0");
  EXPECT_EQ(OverrideError("cluster.datagram_failures_per_s=1000001"),
            "override \"cluster.datagram_failures_per_s=1000001\": "
            "cluster.datagram_failures_per_s: must be 1 to 1000000, got 1000001");
  EXPECT_EQ(OverrideError("cluster.proof_checks_per_member_per_s=-5"),
            "override \"cluster.proof_checks_per_member_per_s=-5\": "
            "cluster.proof_checks_per_member_per_s: must be 1 to 100000, got -5");
  EXPECT_EQ(OverrideError("cluster.proof_checks_per_s=0"),
            "override \"cluster.proof_checks_per_s=0\": cluster.proof_checks_per_s: must be 1 "
            "to 1000000, got 0");
  EXPECT_EQ(OverrideError("cluster.tls_cipher_threads=0"),
            "override \"cluster.tls_cipher_threads=0\": cluster.tls_cipher_threads: must be 1 to "
            "64, got 0");
  EXPECT_EQ(OverrideError("cluster.tls_cipher_threads=65"),
            "override \"cluster.tls_cipher_threads=65\": cluster.tls_cipher_threads: must be 1 "
            "to 64, got 65");
  EXPECT_EQ(OverrideError("cluster.tls_cipher_nice=-1"),
            "override \"cluster.tls_cipher_nice=-1\": cluster.tls_cipher_nice: must be 0 to 19, "
            "got -1");
  EXPECT_THAT(OverrideError("cluster.tls_cipher_library=boringssl"),
              HasSubstr("cluster.tls_cipher_library: must be one of auto, openssl, ipsec-mb; "
                        "got \"boringssl\""));
  EXPECT_EQ(OverrideError("cluster.tls_cipher_nice=20"),
            "override \"cluster.tls_cipher_nice=20\": cluster.tls_cipher_nice: must be 0 to 19, "
            "got 20");
  EXPECT_THAT(OverrideError("cluster.proof_checks_per_s=many"),
              HasSubstr("cluster.proof_checks_per_s"));
  EXPECT_THAT(FileError("[cluster]\ndatagram_failures_per_s = 0\n"),
              HasSubstr("cluster.datagram_failures_per_s: must be 1 to 1000000, got 0"));
  EXPECT_THAT(FileError("[cluster]\ndatagram_failures_per_s = 0\n"), HasSubstr(ErrorFilePath()));
}

TEST(DaemonConfigErrorTest, ClusterKeys) {
  EXPECT_THAT(OverrideError("peer.listen_address=nohost"), HasSubstr("must be \"host:port\""));
  EXPECT_THAT(OverrideError("peer.listen_address=h:70000"), HasSubstr("port 1 to 65535"));
  EXPECT_THAT(OverrideError("ec.k=0"), HasSubstr("ec.k: must be 1 to 64"));
  EXPECT_THAT(OverrideError("peer.data_path=rdma"), HasSubstr("peer.data_path"));
  EXPECT_THAT(OverrideError("peer.data_path=rdma"), HasSubstr("tcp"));
  EXPECT_THAT(OverrideError("peer.data_port=70000"), HasSubstr("peer.data_port: must be 0 to 65535"));
  EXPECT_THAT(OverrideError("cluster.members=h:1"), HasSubstr("need peer.listen_address"));
  EXPECT_THAT(OverrideError("liveness.indirect_probes=17"),
              HasSubstr("liveness.indirect_probes: must be 0 to 16"));
  EXPECT_THAT(OverrideError("liveness.suspicion_mult=0"),
              HasSubstr("liveness.suspicion_mult: must be 1 to 1000"));
  EXPECT_THAT(OverrideError("liveness.transport=tcp"), HasSubstr("liveness.transport"));
  EXPECT_THAT(OverrideError("liveness.transport=tcp"), HasSubstr("udp"));
  EXPECT_THAT(OverrideError("store.filesystem_check=ignore"), HasSubstr("refuse"));
  absl::StatusOr<DaemonConfig> config = LoadDaemonConfig(
      "", {"liveness.heartbeat_ms=500", "liveness.timeout_ms=500"});
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(std::string(config.status().message()), HasSubstr("must exceed"));
}

TEST(DaemonConfigTest, TokenAndMetricsKeys) {
  absl::StatusOr<DaemonConfig> defaults = LoadDaemonConfig("", {});
  ASSERT_TRUE(defaults.ok()) << defaults.status();
  EXPECT_EQ(defaults->cluster.token, "");
  EXPECT_EQ(defaults->metrics.listen_address, "");
  absl::StatusOr<DaemonConfig> config = LoadDaemonConfig(
      "", {"cluster.token=0123456789abcdef-XYZ", "metrics.listen_address=127.0.0.1:9464"});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->cluster.token, "0123456789abcdef-XYZ");
  EXPECT_EQ(config->metrics.listen_address, "127.0.0.1:9464");

  // The file's token, whitespace trimmed, takes the place of cluster.token.
  const std::string path = WriteTempFile("token", "\n  s3cret-token-0123456789 \n");
  config = LoadDaemonConfig("", {"cluster.token_file=" + path});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->cluster.token, "s3cret-token-0123456789");
  EXPECT_EQ(config->cluster.token_file, path);
}

TEST(DaemonConfigErrorTest, TokenAndMetricsKeys) {
  EXPECT_THAT(OverrideError("cluster.token=short"),
              HasSubstr("cluster.token: must be empty (admin over TCP off) or 16 to 1024"));
  EXPECT_THAT(OverrideError("cluster.token=\"0123456789 abcdef\""),
              HasSubstr("including a space or control byte"));
  EXPECT_THAT(OverrideError("cluster.token_file=relative/token"),
              HasSubstr("must be an absolute path"));
  EXPECT_THAT(OverrideError("metrics.listen_address=9464"), HasSubstr("must be \"host:port\""));
  const std::string path = WriteTempFile("token2", "0123456789abcdef0123");
  absl::StatusOr<DaemonConfig> both =
      LoadDaemonConfig("", {"cluster.token=0123456789abcdef", "cluster.token_file=" + path});
  ASSERT_FALSE(both.ok());
  EXPECT_THAT(std::string(both.status().message()), HasSubstr("both set: set one"));

  absl::StatusOr<DaemonConfig> missing =
      LoadDaemonConfig("", {"cluster.token_file=/nonexistent/tessera-token"});
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound) << missing.status();
  EXPECT_THAT(std::string(missing.status().message()),
              HasSubstr("cluster.token_file: cannot read /nonexistent/tessera-token"));
  const std::string empty = WriteTempFile("token3", " \n");
  absl::StatusOr<DaemonConfig> empty_token =
      LoadDaemonConfig("", {"cluster.token_file=" + empty});
  ASSERT_FALSE(empty_token.ok());
  EXPECT_THAT(std::string(empty_token.status().message()), HasSubstr("is empty"));
}

}  // namespace
}  // namespace tessera
