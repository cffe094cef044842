// The deployment files in deploy/ checked for what matters: the example config and the
// Kubernetes ConfigMap's config load with the daemon's own loader, the DaemonSet shares the
// node's IPC namespace and shared memory, sizes the pod's memory for the store, is probed through
// `tessera status` and drains before it stops, the headless Service is the name the daemons
// resolve, and the systemd unit is Type=notify with a watchdog and a runtime directory for the
// socket (and passes `systemd-analyze verify` where systemd is installed).
//
// The YAML is read by Python's yaml module (Debian's python3-yaml) and handed over as JSON: no
// offline Kubernetes schema validator is packaged by Debian or npm.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "daemon/daemon_config.h"
#include "gmock/gmock.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"
#include "tests/harness.h"

namespace tessera::testing {
namespace {

using google::protobuf::Value;
using ::testing::Contains;
using ::testing::HasSubstr;
using Object = google::protobuf::Map<std::string, Value>;

// A field of a JSON object, failing the test (and returning null) when absent.
const Value& Field(const Value& object, const std::string& path) {
  static const Value* null = new Value();
  const Value* v = &object;
  for (absl::string_view key : absl::StrSplit(path, '.')) {
    const Object& fields = v->struct_value().fields();
    auto it = fields.find(std::string(key));
    if (it == fields.end()) {
      ADD_FAILURE() << "no field " << path << " (missing " << key << ")";
      return *null;
    }
    v = &it->second;
  }
  return *v;
}

std::vector<std::string> Strings(const Value& list) {
  std::vector<std::string> out;
  for (const Value& v : list.list_value().values()) out.push_back(v.string_value());
  return out;
}

// A Kubernetes quantity such as "80Gi" or "512Mi" in bytes.
uint64_t Quantity(const std::string& q) {
  static const std::map<std::string, uint64_t> units = {
      {"Ki", 1ull << 10}, {"Mi", 1ull << 20}, {"Gi", 1ull << 30},  {"Ti", 1ull << 40},
      {"K", 1000ull},     {"M", 1000000ull},  {"G", 1000000000ull}};
  for (const auto& [suffix, factor] : units) {
    uint64_t n;
    if (absl::EndsWith(q, suffix) && absl::SimpleAtoi(q.substr(0, q.size() - suffix.size()), &n)) {
      return n * factor;
    }
  }
  uint64_t n = 0;
  EXPECT_TRUE(absl::SimpleAtoi(q, &n)) << "quantity " << q;
  return n;
}

class DeployTest : public ::testing::Test {
 protected:
  void SetUp() override {
    token_file_ = root_.path() + "/token";
    std::ofstream(token_file_) << "deploy-test-token-0123456789\n";
  }

  // Loads `path` with the daemon's loader; cluster.token_file points at a test token, and the
  // cluster.tls_* files (when the config names them) at certificates made here by
  // tools/make-cluster-certs.sh, since the deployed paths do not exist here.
  absl::StatusOr<DaemonConfig> Load(const std::string& path,
                                    std::vector<std::string> overrides = {}) {
    overrides.push_back("cluster.token_file=" + token_file_);
    if (absl::StrContains(ReadFile(path), "tls_cert_file")) {
      // A daemon's certificate names its node id (the DaemonSet's node.id is the node's name).
      const std::string certs = root_.path() + "/tls";
      auto made = Process::Start({"/bin/bash", BinaryPath("tools/make-cluster-certs.sh"), certs,
                                  "gpu-node-7"});
      if (made->Wait(std::chrono::seconds(60)) != 0) {
        return absl::FailedPreconditionError(
            "tools/make-cluster-certs.sh failed (is openssl installed?): " +
            absl::StrJoin(made->lines(), "\n"));
      }
      overrides.push_back("node.id=gpu-node-7");
      overrides.push_back("cluster.tls_cert_file=" + certs + "/gpu-node-7.crt");
      overrides.push_back("cluster.tls_key_file=" + certs + "/gpu-node-7.key");
      overrides.push_back("cluster.tls_ca_file=" + certs + "/ca.crt");
    }
    return LoadDaemonConfig(path, overrides);
  }

  TempRoot root_;
  std::string token_file_;
};

TEST_F(DeployTest, ExampleConfigLoadsWithExplicitSizes) {
  auto config = Load(BinaryPath("deploy/tesserad.toml"));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_GT(config->store.capacity_bytes, 0) << "store.capacity_bytes must be sized explicitly";
  EXPECT_EQ(config->agent.socket_path, "/run/tessera/agent.sock");
  EXPECT_FALSE(config->peer.listen_address.empty());
  EXPECT_GE(config->cluster.members.size(), static_cast<size_t>(config->ec.k + config->ec.m + 1))
      << "fewer members than k+m+1: k would shrink";
  EXPECT_FALSE(config->cluster.token.empty());
  EXPECT_FALSE(config->metrics.listen_address.empty());
  // Fragments take the raw TCP data path, on a fixed port a firewall can name.
  EXPECT_EQ(config->peer.data_path, "tcp");
  EXPECT_GT(config->peer.data_port, 0);
  // The config file names a token file that exists once deployed (not here).
  EXPECT_THAT(ReadFile(BinaryPath("deploy/tesserad.toml")),
              HasSubstr("token_file = \"/etc/tessera/token\""));
}

TEST_F(DeployTest, SystemdUnitIsNotifyWithWatchdogAndRuntimeDirectory) {
  const std::string unit = ReadFile(BinaryPath("deploy/tesserad.service"));
  std::map<std::string, std::string> keys;
  for (absl::string_view line : absl::StrSplit(unit, '\n')) {
    if (line.empty() || line[0] == '#' || line[0] == '[') continue;
    std::pair<std::string, std::string> kv = absl::StrSplit(line, absl::MaxSplits('=', 1));
    EXPECT_EQ(keys.count(kv.first), 0u) << kv.first << " set twice";
    keys[kv.first] = kv.second;
  }
  EXPECT_EQ(keys["Type"], "notify");
  EXPECT_EQ(keys["NotifyAccess"], "main");
  int watchdog_s = 0;
  EXPECT_TRUE(absl::SimpleAtoi(keys["WatchdogSec"], &watchdog_s)) << keys["WatchdogSec"];
  EXPECT_GT(watchdog_s, 0);
  EXPECT_EQ(keys["Restart"], "always");
  auto config = Load(BinaryPath("deploy/tesserad.toml"));
  ASSERT_TRUE(config.ok()) << config.status();
  // The socket lives in the runtime directory systemd creates: /run/<RuntimeDirectory>/.
  EXPECT_EQ("/run/" + keys["RuntimeDirectory"],
            std::filesystem::path(config->agent.socket_path).parent_path().string());
  EXPECT_THAT(keys["ExecStart"],
              HasSubstr("/usr/bin/tesserad --config /etc/tessera/tesserad.toml"));
  // The jobs' state files live on disk, in the state directory systemd creates for the daemon's
  // user: /var/lib/<StateDirectory>.
  EXPECT_EQ("/var/lib/" + keys["StateDirectory"], config->store.state_directory);
  EXPECT_EQ(keys["StateDirectoryMode"], "0700");
  // Unprivileged and without any capability: trainers of other uids get ACLs, not chowned files.
  EXPECT_EQ(keys["User"], "tessera");
  EXPECT_EQ(keys.count("CapabilityBoundingSet"), 1u);
  EXPECT_EQ(keys["CapabilityBoundingSet"], "");
  EXPECT_EQ(keys["AmbientCapabilities"], "");
  int stop_s = 0;
  EXPECT_TRUE(absl::SimpleAtoi(keys["TimeoutStopSec"], &stop_s));
  EXPECT_GT(stop_s * 1000, config->daemon.drain_timeout_ms) << "systemd would kill the drain";

  // systemd's own check, on a copy whose ExecStart is the binary built here.
  const std::string analyze = "/usr/bin/systemd-analyze";
  if (access(analyze.c_str(), X_OK) != 0) {
    std::printf("%s not installed: unit syntax not checked by systemd\n", analyze.c_str());
    return;
  }
  const std::string copy = root_.path() + "/tesserad.service";
  std::string patched = unit;
  const std::string exec = "ExecStart=/usr/bin/tesserad";
  ASSERT_NE(patched.find(exec), std::string::npos);
  patched.replace(patched.find(exec), exec.size(), "ExecStart=" + BinaryPath("daemon/tesserad"));
  std::ofstream(copy) << patched;
  const std::string err_path = root_.path() + "/analyze.err";
  auto process = Process::Start({analyze, "verify", copy}, err_path);
  EXPECT_EQ(process->Wait(std::chrono::seconds(60)), 0);
  EXPECT_EQ(ReadFile(err_path), "") << "systemd-analyze verify complains";
}

class KubernetesTest : public DeployTest {
 protected:
  void SetUp() override {
    DeployTest::SetUp();
    const std::string err_path = root_.path() + "/yaml.err";
    auto process = Process::Start(
        {"/usr/bin/python3", "-c",
         "import json, sys, yaml\n"
         "json.dump({'documents': list(yaml.safe_load_all(open(sys.argv[1])))}, sys.stdout)\n"
         "print()\n",
         BinaryPath("deploy/kubernetes/tesserad.yaml")},
        err_path);
    ASSERT_EQ(process->Wait(std::chrono::seconds(60)), 0)
        << "python3 with yaml (Debian: python3-yaml) could not read the manifests:\n"
        << ReadFile(err_path);
    Value parsed;
    auto status =
        google::protobuf::util::JsonStringToMessage(absl::StrJoin(process->lines(), "\n"), &parsed);
    ASSERT_TRUE(status.ok()) << status.ToString();
    for (const Value& doc : Field(parsed, "documents").list_value().values()) {
      documents_[Field(doc, "kind").string_value()] = doc;
    }
    ASSERT_EQ(documents_.size(), 3u);
    for (const char* kind : {"ConfigMap", "Service", "DaemonSet"}) {
      ASSERT_EQ(documents_.count(kind), 1u) << kind;
      EXPECT_EQ(Field(documents_[kind], "metadata.namespace").string_value(), "tessera") << kind;
    }
    const Value& pod = Field(documents_["DaemonSet"], "spec.template.spec");
    ASSERT_EQ(Field(pod, "containers").list_value().values_size(), 1);
    pod_ = pod;
    container_ = Field(pod, "containers").list_value().values(0);

    // The ConfigMap's config, loaded as the DaemonSet's arguments would load it.
    const std::string toml = root_.path() + "/configmap.toml";
    const Object& data = Field(documents_["ConfigMap"], "data").struct_value().fields();
    ASSERT_EQ(data.count("tesserad.toml"), 1u) << "the ConfigMap has no tesserad.toml";
    std::ofstream(toml) << data.at("tesserad.toml").string_value();
    auto config = Load(toml, {"node.id=gpu-node-1", "peer.advertise_address=10.1.2.3:7070"});
    ASSERT_TRUE(config.ok()) << config.status();
    config_ = *config;
  }

  // The volume mounted at `mount_path`, or null.
  const Value* VolumeAt(const std::string& mount_path) {
    std::string name;
    for (const Value& m : Field(container_, "volumeMounts").list_value().values()) {
      if (Field(m, "mountPath").string_value() == mount_path)
        name = Field(m, "name").string_value();
    }
    for (const Value& v : Field(pod_, "volumes").list_value().values()) {
      if (!name.empty() && Field(v, "name").string_value() == name) return &v;
    }
    ADD_FAILURE() << "no volume mounted at " << mount_path;
    return nullptr;
  }

  std::map<std::string, Value> documents_;
  Value pod_, container_;
  DaemonConfig config_;
};

// The peer port runs mutual TLS from the node's own certificate (it names the node, so it is
// per node: from the host, not a Secret every pod would share), mounted where the config looks.
TEST_F(KubernetesTest, PeersUseMutualTlsFromTheNodesOwnCertificate) {
  const Object& data = Field(documents_["ConfigMap"], "data").struct_value().fields();
  const std::string toml = data.at("tesserad.toml").string_value();
  for (const char* line : {"tls_cert_file = \"/etc/tessera/tls/tls.crt\"",
                           "tls_key_file = \"/etc/tessera/tls/tls.key\"",
                           "tls_ca_file = \"/etc/tessera/tls/ca.crt\""}) {
    EXPECT_THAT(toml, HasSubstr(line));
  }
  EXPECT_FALSE(config_.cluster.tls_cert_file.empty());  // loaded, with the test's certificates
  const Value* tls = VolumeAt("/etc/tessera/tls");
  ASSERT_NE(tls, nullptr) << "nothing is mounted at /etc/tessera/tls";
  EXPECT_EQ(Field(*tls, "hostPath.path").string_value(), "/etc/tessera/tls");
  EXPECT_EQ(Field(*tls, "hostPath.type").string_value(), "Directory");
}

// The daemon runs as a non-root uid with every capability dropped: it serves trainers of any
// uid through ACLs on its own files (tests:isolation_test UnprivilegedDaemonTest).
TEST_F(KubernetesTest, RunsUnprivilegedWithoutCapabilities) {
  EXPECT_GT(Field(pod_, "securityContext.runAsUser").number_value(), 0);
  EXPECT_FALSE(Field(container_, "securityContext.allowPrivilegeEscalation").bool_value());
  const auto& dropped = Field(container_, "securityContext.capabilities.drop").list_value();
  ASSERT_EQ(dropped.values_size(), 1);
  EXPECT_EQ(dropped.values(0).string_value(), "ALL");
  EXPECT_EQ(Field(container_, "securityContext.capabilities").struct_value().fields().count("add"),
            0u);
}

TEST_F(KubernetesTest, SharesTheNodesMemoryAndSizesItExplicitly) {
  EXPECT_TRUE(Field(pod_, "hostIPC").bool_value());
  // The store: the node's tmpfs, at the same path in the daemon and the trainers' pods.
  const Value* store = VolumeAt(config_.store.directory);
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(Field(*store, "hostPath.path").string_value(), config_.store.directory);
  EXPECT_THAT(config_.store.directory, ::testing::StartsWith("/dev/shm/"));
  // The jobs' state files: on the node's disk, so that they outlive a reboot.
  const Value* state = VolumeAt(config_.store.state_directory);
  ASSERT_NE(state, nullptr) << "nothing is mounted at store.state_directory '"
                            << config_.store.state_directory << "'";
  EXPECT_EQ(Field(*state, "hostPath.path").string_value(), config_.store.state_directory);
  EXPECT_THAT(config_.store.state_directory, ::testing::StartsWith("/var/lib/"));
  // Sized explicitly, and the pod's memory (which the pre-faulted pages are charged to) covers it.
  EXPECT_GT(config_.store.capacity_bytes, int64_t{1} << 30);
  const uint64_t request = Quantity(Field(container_, "resources.requests.memory").string_value());
  const uint64_t limit = Quantity(Field(container_, "resources.limits.memory").string_value());
  EXPECT_EQ(request, limit);
  EXPECT_GE(limit, static_cast<uint64_t>(config_.store.capacity_bytes) + (1ull << 30));
  // The agent socket's directory, shared with the trainers through the host.
  const std::string run_dir =
      std::filesystem::path(config_.agent.socket_path).parent_path().string();
  const Value* run = VolumeAt(run_dir);
  ASSERT_NE(run, nullptr);
  EXPECT_EQ(Field(*run, "hostPath.path").string_value(), run_dir);
}

TEST_F(KubernetesTest, ProbedThroughTesseraStatusAndDrainedBeforeStop) {
  const std::vector<std::string> probe = Strings(Field(container_, "readinessProbe.exec.command"));
  ASSERT_GE(probe.size(), 3u);
  EXPECT_THAT(probe[0], HasSubstr("tessera"));
  EXPECT_EQ(probe[1], "status");
  EXPECT_THAT(probe, Contains("--probe"));
  auto socket = std::find(probe.begin(), probe.end(), "--socket");
  ASSERT_NE(socket, probe.end());
  ASSERT_NE(socket + 1, probe.end());
  EXPECT_EQ(*(socket + 1), config_.agent.socket_path);

  const std::vector<std::string> pre_stop =
      Strings(Field(container_, "lifecycle.preStop.exec.command"));
  EXPECT_THAT(absl::StrJoin(pre_stop, " "), HasSubstr("kill -TERM 1"));
  const double grace_s = Field(pod_, "terminationGracePeriodSeconds").number_value();
  EXPECT_GT(grace_s * 1000, config_.daemon.drain_timeout_ms);
}

TEST_F(KubernetesTest, DaemonsFindEachOtherThroughTheHeadlessService) {
  const Value& service = documents_["Service"];
  EXPECT_EQ(Field(service, "spec.clusterIP").string_value(), "None");
  EXPECT_EQ(
      config_.cluster.dns_name,
      absl::StrCat(Field(service, "metadata.name").string_value(), ".",
                   Field(service, "metadata.namespace").string_value(), ".svc.cluster.local"));
  bool peer_port = false;
  for (const Value& port : Field(service, "spec.ports").list_value().values()) {
    if (Field(port, "name").string_value() == "peer") {
      peer_port =
          static_cast<int64_t>(Field(port, "port").number_value()) == config_.cluster.dns_port;
    }
  }
  EXPECT_TRUE(peer_port) << "the Service's peer port is not cluster.dns_port";
  // Membership datagrams (liveness.transport = "udp") use the peer port's number over UDP.
  EXPECT_EQ(config_.liveness.transport, "udp");
  auto udp = [](const Value& port) {  // "protocol" is optional (TCP when absent)
    const Object& fields = port.struct_value().fields();
    auto it = fields.find("protocol");
    return it != fields.end() && it->second.string_value() == "UDP";
  };
  bool service_udp = false, container_udp = false;
  for (const Value& port : Field(service, "spec.ports").list_value().values()) {
    service_udp = service_udp || (udp(port) && static_cast<int64_t>(Field(port, "port").number_value()) ==
                                                   config_.cluster.dns_port);
  }
  for (const Value& port : Field(container_, "ports").list_value().values()) {
    container_udp = container_udp ||
                    (udp(port) && static_cast<int64_t>(Field(port, "containerPort").number_value()) ==
                                      config_.cluster.dns_port);
  }
  EXPECT_TRUE(service_udp) << "the Service does not list the peer port over UDP";
  EXPECT_TRUE(container_udp) << "the container does not declare the peer port over UDP";
  // The raw TCP data path's fixed port is declared on the Service and the container.
  EXPECT_EQ(config_.peer.data_path, "tcp");
  ASSERT_GT(config_.peer.data_port, 0);
  bool service_data_port = false;
  for (const Value& port : Field(service, "spec.ports").list_value().values()) {
    service_data_port = service_data_port || static_cast<int64_t>(Field(port, "port").number_value()) ==
                                                 config_.peer.data_port;
  }
  EXPECT_TRUE(service_data_port) << "the Service does not list peer.data_port";
  bool container_data_port = false;
  for (const Value& port : Field(container_, "ports").list_value().values()) {
    container_data_port =
        container_data_port ||
        static_cast<int64_t>(Field(port, "containerPort").number_value()) == config_.peer.data_port;
  }
  EXPECT_TRUE(container_data_port) << "the container does not declare peer.data_port";
  // The Service selects the DaemonSet's pods.
  const Object& selector = Field(service, "spec.selector").struct_value().fields();
  const Object& labels =
      Field(documents_["DaemonSet"], "spec.template.metadata.labels").struct_value().fields();
  for (const auto& [key, value] : selector) {
    ASSERT_EQ(labels.count(key), 1u) << key;
    EXPECT_EQ(labels.at(key).string_value(), value.string_value());
  }
  // node.id is the Kubernetes node's name, stable across pod restarts.
  const std::string args = absl::StrJoin(Strings(Field(container_, "args")), " ");
  EXPECT_THAT(args, HasSubstr("--set node.id=$(NODE_NAME)"));
  EXPECT_THAT(args, HasSubstr("--config /etc/tessera/config/tesserad.toml"));
  bool node_name_env = false;
  for (const Value& env : Field(container_, "env").list_value().values()) {
    if (Field(env, "name").string_value() == "NODE_NAME") {
      node_name_env = Field(env, "valueFrom.fieldRef.fieldPath").string_value() == "spec.nodeName";
    }
  }
  EXPECT_TRUE(node_name_env);
}

}  // namespace
}  // namespace tessera::testing
