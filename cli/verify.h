// Text and JSON of Verify and Recover answers, shared by `verify`, `recover` and the drills.
#ifndef TESSERA_CLI_VERIFY_H_
#define TESSERA_CLI_VERIFY_H_

#include <string>

#include "common/json.h"
#include "proto/admin.pb.h"

namespace tessera::cli {

std::string DamageText(const admin::Damage& damage);
Json VerifyJson(const admin::VerifyResponse& verified);
std::string VerifyText(const admin::VerifyResponse& verified);
std::string SourceName(admin::RecoverResponse::Source source);
Json RecoverJson(const admin::RecoverResponse& recovered);
// One line: "rank R step S on NODE: rebuilt from ..., bytes, time; CRC32C ... bit-exact\n".
std::string RecoverText(const admin::RecoverResponse& recovered);

}  // namespace tessera::cli

#endif  // TESSERA_CLI_VERIFY_H_
