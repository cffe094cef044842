// One error model for all of Tessera: absl::Status / absl::StatusOr<T> with canonical codes.
//
//   kUnavailable        the call may be retried as is
//   kAborted            restart the snapshot
//   kDataLoss           a checksum failed
//   kFailedPrecondition the system is not in the state the call needs
//   kResourceExhausted  shared memory is full (the message says how much was asked and is free)
//   kInvalidArgument    the caller passed a bad value (the message names it and what is valid)
//
// Debian's Abseil (20220623) predates ABSL's own status macros, so these are ours.
#ifndef TESSERA_COMMON_STATUS_H_
#define TESSERA_COMMON_STATUS_H_

#include <cerrno>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define TESSERA_STATUS_CONCAT_INNER_(a, b) a##b
#define TESSERA_STATUS_CONCAT_(a, b) TESSERA_STATUS_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status); returns it from the enclosing function if not OK.
#define TESSERA_RETURN_IF_ERROR(expr)                       \
  do {                                                      \
    ::absl::Status tessera_status_ = (expr);                \
    if (!tessera_status_.ok()) return tessera_status_;      \
  } while (0)

// `lhs` = value of `rexpr` (an absl::StatusOr<T>), or returns its status if not OK.
#define TESSERA_ASSIGN_OR_RETURN(lhs, rexpr) \
  TESSERA_ASSIGN_OR_RETURN_IMPL_(TESSERA_STATUS_CONCAT_(tessera_statusor_, __LINE__), lhs, rexpr)

#define TESSERA_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                   \
  if (!statusor.ok()) return std::move(statusor).status();   \
  lhs = std::move(statusor).value()

namespace tessera {

// A status for a failed system call: "<what>: <strerror(err)>", with a code derived from errno
// (ENOSPC/ENOMEM -> kResourceExhausted, ENOENT -> kNotFound, EEXIST -> kAlreadyExists,
// EACCES/EPERM -> kPermissionDenied, EINVAL -> kInvalidArgument, otherwise kInternal).
absl::Status ErrnoStatus(int err, const std::string& what);

// Returns `status` with `context` prepended to its message ("context: message"), same code.
absl::Status Annotate(const absl::Status& status, const std::string& context);

}  // namespace tessera

#endif  // TESSERA_COMMON_STATUS_H_
