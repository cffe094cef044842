#include "daemon/membership/verification_throttle.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

// Offers `throttle` forged datagrams (each fails its check) at 10,000 a second for `span`
// from `start`, from `sources` made-up sources in turn (or from `forged` when it is given), and a
// valid datagram of member 10.0.0.1 every 10 ms, which must always be admitted. Returns the checks
// spent on the forged ones.
int CheckedDuringFlood(VerificationThrottle& throttle, absl::Time start, absl::Duration span,
                       int sources, const std::string& forged = "") {
  int checked = 0;
  const absl::Duration step = absl::Microseconds(100);
  int i = 0;
  for (absl::Time now = start; now < start + span; now += step, ++i) {
    const std::string source = !forged.empty() ? forged : absl::StrCat("10.9.", i % sources);
    if (throttle.Admit(source, now)) {
      ++checked;
      throttle.Failed(source, now);
    }
    if (i % 100 == 0) {
      EXPECT_TRUE(throttle.Admit("10.0.0.1", now)) << "the member's datagram at " << now;
      throttle.Passed("10.0.0.1", now);
    }
  }
  return checked;
}

// 16 failures at once then 10 a second per source; 64 then 100 a second from non-members.
VerificationThrottle::Options Small() {
  VerificationThrottle::Options o;
  o.source_burst = 16;
  o.source_interval = absl::Milliseconds(100);
  o.total_burst = 64;
  o.total_interval = absl::Milliseconds(10);
  return o;
}

const absl::Time kStart = absl::FromUnixSeconds(1000);

TEST(VerificationThrottleTest, OneSourceFloodingCostsItsAllowanceOnly) {
  VerificationThrottle throttle(Small());
  throttle.Passed("10.0.0.1", kStart);
  // 10,000 forged datagrams in 1 s: at most 16 + 1 s / 100 ms checks.
  const int checked = CheckedDuringFlood(throttle, kStart, absl::Seconds(1), 1, "10.9.9.9");
  EXPECT_GE(checked, 16);
  EXPECT_LE(checked, 16 + 10 + 1);
  // Once the flood stops, the source's allowance comes back.
  EXPECT_TRUE(throttle.Admit("10.9.9.9", kStart + absl::Seconds(3)));
}

TEST(VerificationThrottleTest, ForgedSourcesShareOneAllowance) {
  VerificationThrottle throttle(Small());
  throttle.Passed("10.0.0.1", kStart);
  // 20,000 datagrams from 5,000 made-up sources in 2 s: at most 64 + 2 s / 10 ms checks.
  const int checked = CheckedDuringFlood(throttle, kStart, absl::Seconds(2), 5000);
  EXPECT_GE(checked, 64);
  EXPECT_LE(checked, 64 + 200 + 1);
}

TEST(VerificationThrottleTest, AForgedMemberAddressIsBoundedByThatMembersAllowance) {
  VerificationThrottle throttle(Small());
  throttle.Passed("10.0.0.1", kStart);
  throttle.Passed("10.0.0.2", kStart);
  // The flood forges member 10.0.0.2's address: its own allowance bounds it (members do not
  // spend the non-members' one), and member 10.0.0.1 is still admitted.
  const int checked = CheckedDuringFlood(throttle, kStart, absl::Seconds(1), 1, "10.0.0.2");
  EXPECT_GE(checked, 16);
  EXPECT_LE(checked, 16 + 10 + 1);
}

TEST(VerificationThrottleTest, MemoryStaysBoundedAndMembersStayKnown) {
  VerificationThrottle::Options o = Small();
  o.max_sources = 64;
  VerificationThrottle throttle(o);
  throttle.Passed("10.0.0.1", kStart);
  // Far more failing sources than are remembered: the non-members' allowance still holds, and
  // the member is admitted throughout.
  const int checked = CheckedDuringFlood(throttle, kStart, absl::Seconds(1), 100000);
  EXPECT_LE(checked, 64 + 100 + 1);
}

}  // namespace
}  // namespace tessera
