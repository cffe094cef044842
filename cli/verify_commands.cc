// `tessera verify` and `tessera recover`, and the text and JSON of their answers, which the
// drills reuse.
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cli/command.h"
#include "cli/format.h"
#include "cli/verify.h"
#include "common/status.h"

namespace tessera::cli {

std::string DamageText(const admin::Damage& d) {
  return absl::StrCat(d.node_id(), ": ",
                      d.kind() == admin::Damage::FRAGMENT
                          ? absl::StrCat("fragment ", d.fragment_index(), " of rank ", d.rank())
                          : absl::StrCat("shard of rank ", d.rank()),
                      " step ", d.step(), ": ", d.detail());
}

Json VerifyJson(const admin::VerifyResponse& v) {
  Json j = Json::Object();
  j.Set("job", v.job_id());
  j.Set("ok", v.ok());
  j.Set("steps", Json::ArrayOf(v.steps()));
  Json damaged = Json::Array();
  for (const auto& d : v.damaged()) {
    Json x = Json::Object();
    x.Set("node", d.node_id());
    x.Set("kind", d.kind() == admin::Damage::FRAGMENT ? "fragment" : "shard");
    x.Set("rank", d.rank());
    x.Set("step", d.step());
    x.Set("fragment_index", d.fragment_index());
    x.Set("detail", d.detail());
    damaged.Add(std::move(x));
  }
  j.Set("damaged", std::move(damaged));
  Json ranks = Json::Array();
  for (const auto& r : v.ranks()) {
    Json x = Json::Object();
    x.Set("rank", r.rank());
    x.Set("step", r.step());
    x.Set("restorable", r.restorable());
    x.Set("shards_ok", r.shards_ok());
    x.Set("shards_damaged", r.shards_damaged());
    x.Set("fragments_ok", r.fragments_ok());
    x.Set("fragments_damaged", r.fragments_damaged());
    x.Set("k", r.ec_k());
    x.Set("m", r.ec_m());
    x.Set("reason", r.reason());
    ranks.Add(std::move(x));
  }
  j.Set("ranks", std::move(ranks));
  Json nodes = Json::Array();
  for (const auto& n : v.nodes()) {
    Json x = Json::Object();
    x.Set("node", n.node_id());
    x.Set("shards_checked", n.shards_checked());
    x.Set("fragments_checked", n.fragments_checked());
    x.Set("bytes_checked", n.bytes_checked());
    x.Set("duration_ms", n.duration_ms());
    nodes.Add(std::move(x));
  }
  j.Set("nodes", std::move(nodes));
  j.Set("errors", NodeErrorsJson(v.errors()));
  return j;
}

std::string VerifyText(const admin::VerifyResponse& v) {
  uint64_t shards = 0, fragments = 0, bytes = 0;
  for (const auto& n : v.nodes()) {
    shards += n.shards_checked();
    fragments += n.fragments_checked();
    bytes += n.bytes_checked();
  }
  int restorable = 0;
  for (const auto& r : v.ranks()) restorable += r.restorable() ? 1 : 0;
  std::string t =
      absl::StrCat("verify ", v.job_id(), " step", v.steps_size() == 1 ? " " : "s ",
                   v.steps_size() == 0 ? "(none held)" : absl::StrJoin(v.steps(), ","), ": ",
                   v.ok() ? "OK" : "DAMAGED", " — ", shards, " shards and ", fragments,
                   " fragments (", HumanBytes(bytes), ") checked on ", v.nodes_size(), " nodes; ",
                   restorable, " of ", v.ranks_size(), " rank-steps restorable\n");
  for (const auto& d : v.damaged()) absl::StrAppend(&t, "  damaged: ", DamageText(d), "\n");
  for (const auto& r : v.ranks()) {
    if (r.restorable() && r.reason().empty()) continue;
    absl::StrAppend(&t, "  rank ", r.rank(), " step ", r.step(), ": ",
                    r.restorable() ? "restorable" : "NOT RESTORABLE", " (", r.shards_ok(),
                    " shards ok, ", r.shards_damaged(), " damaged; ", r.fragments_ok(),
                    " fragments ok, ", r.fragments_damaged(), " damaged; needs ", r.ec_k(), ")",
                    r.reason().empty() ? "" : ": " + r.reason(), "\n");
  }
  absl::StrAppend(&t, NodeErrorsText(v.errors()));
  return t;
}

std::string SourceName(admin::RecoverResponse::Source source) {
  switch (source) {
    case admin::RecoverResponse::LOCAL:
      return "local";
    case admin::RecoverResponse::COPY:
      return "copy";
    case admin::RecoverResponse::REBUILD:
      return "rebuild";
    default:
      return "unknown";
  }
}

Json RecoverJson(const admin::RecoverResponse& r) {
  Json j = Json::Object();
  j.Set("node", r.node_id());
  j.Set("job", r.job_id());
  j.Set("rank", r.rank());
  j.Set("step", r.step());
  j.Set("source", SourceName(r.source()));
  j.Set("source_node", r.source_node());
  Json fragments = Json::Array();
  for (int i = 0; i < r.fragment_indexes_size(); ++i) {
    Json f = Json::Object();
    f.Set("index", r.fragment_indexes(i));
    f.Set("node", i < r.fragment_nodes_size() ? r.fragment_nodes(i) : "");
    fragments.Add(std::move(f));
  }
  j.Set("fragments", std::move(fragments));
  j.Set("k", r.ec_k());
  j.Set("m", r.ec_m());
  j.Set("shard_bytes", r.shard_bytes());
  j.Set("bytes_moved", r.bytes_moved());
  j.Set("duration_us", r.duration_us());
  j.Set("expected_crc32c", r.expected_crc32c());
  j.Set("actual_crc32c", r.actual_crc32c());
  j.Set("bit_exact", r.crc_matched());
  j.Set("segment_path", r.segment_path());
  return j;
}

std::string RecoverText(const admin::RecoverResponse& r) {
  std::string how;
  switch (r.source()) {
    case admin::RecoverResponse::LOCAL:
      how = "already held there";
      break;
    case admin::RecoverResponse::COPY:
      how = "copied whole from " + r.source_node();
      break;
    default: {
      std::vector<std::string> parts;
      for (int i = 0; i < r.fragment_indexes_size(); ++i) {
        parts.push_back(absl::StrCat(r.fragment_indexes(i), "@",
                                     i < r.fragment_nodes_size() ? r.fragment_nodes(i) : "?"));
      }
      how = absl::StrCat("rebuilt from RS(", r.ec_k(), ",", r.ec_m(), ") fragments ",
                         absl::StrJoin(parts, " "));
    }
  }
  return absl::StrCat(
      "rank ", r.rank(), " step ", r.step(), " on ", r.node_id(), ": ", how, ", ",
      HumanBytes(r.shard_bytes()), ", ", HumanBytes(r.bytes_moved()), " moved in ",
      HumanSeconds(r.duration_us() / 1e6), "; CRC32C ", HexCrc(r.actual_crc32c()),
      r.crc_matched()
          ? " matches the owner's: bit-exact"
          : absl::StrCat(" but the owner sealed ", HexCrc(r.expected_crc32c()), ": NOT bit-exact"),
      "\n");
}

absl::StatusOr<Outcome> RunVerify(Context& ctx) {
  TESSERA_ASSIGN_OR_RETURN(AdminClient * client, ctx.Client());
  admin::VerifyRequest request;
  request.set_job_id(ctx.args().positional()[0]);
  if (ctx.args().Has("step")) {
    TESSERA_ASSIGN_OR_RETURN(int64_t step, ctx.args().GetInt("step", 0, 0, INT64_MAX));
    request.set_step(step);
  }
  request.set_local_only(ctx.args().Has("local"));
  TESSERA_ASSIGN_OR_RETURN(admin::VerifyResponse verified, client->Verify(request));
  Outcome outcome;
  outcome.exit_code = verified.ok() ? kExitOk : kExitUnhealthy;
  outcome.json = VerifyJson(verified);
  outcome.text = VerifyText(verified);
  return outcome;
}

absl::StatusOr<Outcome> RunRecover(Context& ctx) {
  TESSERA_ASSIGN_OR_RETURN(int64_t rank, ctx.args().GetInt("rank", 0, 0, UINT32_MAX));
  TESSERA_ASSIGN_OR_RETURN(AdminClient * client, ctx.Client());
  admin::RecoverRequest request;
  request.set_job_id(ctx.args().positional()[0]);
  request.set_rank(static_cast<uint32_t>(rank));
  if (ctx.args().Has("step")) {
    TESSERA_ASSIGN_OR_RETURN(int64_t step, ctx.args().GetInt("step", 0, 0, INT64_MAX));
    request.set_step(step);
  }
  request.set_node_id(ctx.args().Get("node"));
  request.set_from_fragments(ctx.args().Has("from-fragments"));
  TESSERA_ASSIGN_OR_RETURN(admin::RecoverResponse recovered, client->Recover(request));
  Outcome outcome;
  outcome.exit_code = recovered.crc_matched() ? kExitOk : kExitUnhealthy;
  outcome.json = RecoverJson(recovered);
  outcome.text = "recovered " + recovered.job_id() + " " + RecoverText(recovered);
  return outcome;
}

}  // namespace tessera::cli
