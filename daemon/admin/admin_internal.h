// What the files of Admin (admin_service.cc, admin_actions.cc) share; not part of its
// interface: how it asks the other members' admin services, and how it reports a member that
// could not be asked.
#ifndef TESSERA_DAEMON_ADMIN_ADMIN_INTERNAL_H_
#define TESSERA_DAEMON_ADMIN_ADMIN_INTERNAL_H_

#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/grpc_status.h"
#include "daemon/admin/admin_service.h"
#include "grpcpp/client_context.h"

namespace tessera {
namespace admin_internal {

// Adds `error` about the member (node_id, address) to a response's errors.
void AddError(google::protobuf::RepeatedPtrField<admin::NodeError>* errors,
              const std::string& node_id, const std::string& address, const std::string& error);

}  // namespace admin_internal

template <typename Request, typename Response>
absl::Status Admin::AskPeer(const std::string& node_id, StubMethod<Request, Response> method,
                            const Request& request, Response* response, absl::Duration timeout) {
  if (parts_.cluster == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "node '", node_id, "' is not this daemon ('", parts_.node_id,
        "'), and this daemon is standalone (no peer.listen_address): it reaches no other node"));
  }
  std::optional<std::string> address = parts_.cluster->AddressOf(node_id);
  if (!address) {
    return absl::NotFoundError(absl::StrCat("node '", node_id, "' is not a live member; live: ",
                                            absl::StrJoin(parts_.cluster->LiveNodeIds(), ", ")));
  }
  if (parts_.config->cluster.token.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("cannot ask node '", node_id,
                                                      "': cluster.token is not set, so daemons "
                                                      "cannot call each other's admin service"));
  }
  grpc::ClientContext context;
  context.AddMetadata(kAdminTokenMetadataKey, parts_.config->cluster.token);
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  absl::Status status = FromGrpcStatus(
      (StubFor(PeerTarget(*address, node_id))->*method)(&context, request, response));
  if (!status.ok()) {
    return absl::Status(status.code(),
                        absl::StrCat("node '", node_id, "' (", *address, "): ", status.message()));
  }
  return absl::OkStatus();
}

template <typename Request, typename Response>
std::vector<Admin::PeerAnswer<Response>> Admin::AskPeers(StubMethod<Request, Response> method,
                                                         const Request& request,
                                                         absl::Duration timeout) {
  std::vector<PeerAnswer<Response>> answers;
  if (parts_.cluster == nullptr) return answers;
  for (const Cluster::PeerView& peer : parts_.cluster->Peers()) {
    if (!peer.alive) continue;
    PeerAnswer<Response> answer;
    answer.node_id = peer.node_id;
    answer.address = peer.address;
    answers.push_back(std::move(answer));
  }
  std::vector<std::thread> threads;
  for (auto& answer : answers) {
    threads.emplace_back([&, method] {
      if (parts_.config->cluster.token.empty()) {
        answer.status = absl::FailedPreconditionError(
            "not asked: cluster.token is not set, so daemons cannot call each other's admin "
            "service");
        return;
      }
      grpc::ClientContext context;
      context.AddMetadata(kAdminTokenMetadataKey, parts_.config->cluster.token);
      context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
      answer.status = FromGrpcStatus((StubFor(PeerTarget(answer.address, answer.node_id))->*method)(
          &context, request, &answer.response));
    });
  }
  for (std::thread& t : threads) t.join();
  return answers;
}

}  // namespace tessera

#endif  // TESSERA_DAEMON_ADMIN_ADMIN_INTERNAL_H_
