// Test only: a CA made in memory and the certificates it issues, written as PEM files, so that
// unit tests can run mutual TLS without tools/make-cluster-certs.sh. Certificates are EC P-256,
// valid from an hour ago for a day, for server and client authentication.
#ifndef TESSERA_DAEMON_TRANSFER_TEST_CERTIFICATES_H_
#define TESSERA_DAEMON_TRANSFER_TEST_CERTIFICATES_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "daemon/transfer/cluster_tls.h"

namespace tessera {

class TestCa {
 public:
  // A new CA (common name `name`) whose files go under `dir` (which must exist): dir/<name>.crt.
  // Without a dir, under a new directory in /tmp, removed with the CA.
  static absl::StatusOr<std::unique_ptr<TestCa>> Create(const std::string& dir = "",
                                                        const std::string& name = "test-ca");
  ~TestCa();

  // Issues dir/<name>.crt and dir/<name>.key, common name `name`, with a subjectAltName URI
  // tessera-node:<id> per entry of `node_ids` (none: an operator's certificate). The returned
  // files trust this CA.
  absl::StatusOr<ClusterTlsFiles> Issue(const std::string& name,
                                        const std::vector<std::string>& node_ids);
  // A node's certificate: Issue(node_id, {node_id}).
  absl::StatusOr<ClusterTlsFiles> IssueNode(const std::string& node_id) {
    return Issue(node_id, {node_id});
  }

  const std::string& ca_file() const { return ca_file_; }

 private:
  TestCa() = default;
  std::string dir_;
  bool own_dir_ = false;
  std::string ca_file_;
  void* key_ = nullptr;   // EVP_PKEY*
  void* cert_ = nullptr;  // X509*
  long serial_ = 1;
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_TRANSFER_TEST_CERTIFICATES_H_
