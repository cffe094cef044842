#include "cli/args.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera::cli {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

const CommandSpec& Recover() {
  static const CommandSpec* spec = new CommandSpec{
      "recover",
      {"JOB"},
      {{"rank", "R", "the rank", true}, {"step", "S", "the step"}, {"from-fragments", "", "x"}},
      "",
      ""};
  return *spec;
}

std::string ErrorOf(const std::vector<std::string>& args) {
  auto parsed = ParseCommandArgs(Recover(), args);
  if (parsed.ok()) return "(parsed)";
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(parsed.status().message());
}

TEST(ArgsTest, FlagsInBothFormsAnywhere) {
  auto parsed = ParseCommandArgs(
      Recover(), {"--rank", "3", "job-a", "--step=12", "--from-fragments", "--json"});
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_THAT(parsed->positional(), ElementsAre("job-a"));
  EXPECT_EQ(*parsed->GetInt("rank", -1, 0, 100), 3);
  EXPECT_EQ(*parsed->GetInt("step", -1, 0, 100), 12);
  EXPECT_TRUE(parsed->Has("from-fragments"));
  EXPECT_TRUE(parsed->Has("json"));
  EXPECT_FALSE(parsed->Has("socket"));
  EXPECT_EQ(parsed->Get("socket", "/run/x"), "/run/x");
}

TEST(ArgsTest, ErrorsNameTheArgumentAndWhatIsRight) {
  EXPECT_THAT(ErrorOf({"job", "--rnak", "1"}),
              HasSubstr("unknown flag --rnak for tessera recover (did you mean --rank?)"));
  EXPECT_THAT(ErrorOf({"job", "--rnak", "1"}), HasSubstr("valid flags: --rank, --step"));
  EXPECT_THAT(ErrorOf({"job", "--rank"}), HasSubstr("--rank needs a value: --rank R"));
  EXPECT_THAT(ErrorOf({"job", "--rank="}), HasSubstr("--rank needs a non-empty value"));
  EXPECT_THAT(ErrorOf({"job", "--rank", "1", "--rank", "2"}), HasSubstr("--rank is given twice"));
  EXPECT_THAT(ErrorOf({"job", "--rank", "1", "--json=yes"}), HasSubstr("--json takes no value"));
  EXPECT_THAT(ErrorOf({"job"}), HasSubstr("tessera recover needs --rank R"));
  EXPECT_THAT(ErrorOf({"--rank", "1"}), HasSubstr("tessera recover needs JOB"));
  EXPECT_THAT(ErrorOf({"a", "b", "--rank", "1"}), HasSubstr("unexpected argument \"b\""));
  EXPECT_THAT(ErrorOf({"a", "-r", "1"}), HasSubstr("flags start with two dashes"));
  EXPECT_THAT(ErrorOf({"a"}), HasSubstr("usage: tessera recover JOB --rank R [--step S] "
                                        "[--from-fragments]"));
}

TEST(ArgsTest, NumbersAreCheckedWithTheirRange) {
  auto parsed = ParseCommandArgs(Recover(), {"j", "--rank", "x7", "--step", "-1"});
  ASSERT_TRUE(parsed.ok());
  EXPECT_THAT(std::string(parsed->GetInt("rank", 0, 0, 10).status().message()),
              HasSubstr("--rank \"x7\": need an integer from 0 to 10"));
  EXPECT_THAT(std::string(parsed->GetInt("step", 0, 0, INT64_MAX).status().message()),
              HasSubstr("--step \"-1\": need an integer >= 0"));
  EXPECT_THAT(std::string(parsed->GetDouble("step", 0, 0).status().message()),
              HasSubstr("need a number > 0"));
  EXPECT_EQ(*parsed->GetDouble("step", 0, -1, true), -1);
  EXPECT_EQ(*parsed->GetDouble("absent", 2.5, 0), 2.5);
}

TEST(ArgsTest, HelpSkipsTheOtherChecks) {
  auto parsed = ParseCommandArgs(Recover(), {"--help"});
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_TRUE(parsed->Has("help"));
}

TEST(ArgsTest, ClosestFindsTyposOnly) {
  EXPECT_EQ(Closest("stauts", {"status", "jobs"}), "status");
  EXPECT_EQ(Closest("zzzzzz", {"status", "jobs"}), "");
}

}  // namespace
}  // namespace tessera::cli
