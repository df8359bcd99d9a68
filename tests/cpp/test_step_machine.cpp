// The step rule above the Timeline (timing/step_machine.h), fed as a hook layer would.
#include <gtest/gtest.h>

#include <memory>
#include <set>
#include <thread>
#include <vector>

#include "timing/step_machine.h"
#include "timing/timeline.h"

using namespace stepscope::timing;

namespace {

// A host whose calls run while their token is in `running`; it counts what it holds.
struct FakeHost : StepHost {
  std::set<Token> running, foreign;
  std::multiset<Token> held;
  bool fail = false;
  bool live(Token call) override { return running.count(call) > 0; }
  void hold(Token t) override { held.insert(t); }
  void release(Token t) override {
    auto it = held.find(t);
    ASSERT_NE(it, held.end()) << "released a token that was not held";
    held.erase(it);
  }
  int owns(Token opt) override { return fail ? -1 : foreign.count(opt) == 0; }
};

std::shared_ptr<Timeline> timeline() { return std::make_shared<Timeline>(TimelineOptions{.nvtx = false}); }

int opt_a, opt_b, opt_c, call_1, call_2, call_3;  // identities only

// One training step through the hooks: forward, backward (straight to the Timeline, as autograd
// does), then the given optimizers' steps; whether the last one ended the step.
bool train_step(StepMachine& m, FakeHost& h, std::vector<const void*> opts) {
  h.running.insert(&call_1);
  EXPECT_TRUE(m.forward_begin(false, 4, &call_1));
  EXPECT_TRUE(m.forward_end());
  h.running.erase(&call_1);
  m.timeline().backward_begin();
  m.timeline().backward_end();
  bool ended = false;
  for (const void* o : opts) {
    h.running.insert(&call_2);
    m.optimizer_begin(o, &call_2);
    ended = m.optimizer_end(o);
    h.running.erase(&call_2);
  }
  return ended;
}

}  // namespace

TEST(TimingStepMachine, OneOptimizerEndsEveryStep) {
  FakeHost h;
  StepMachine m(timeline(), 1, &h);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(train_step(m, h, {&opt_a}));
  EXPECT_EQ(m.timeline().steps(), 3);
  EXPECT_TRUE(h.held.empty());
}

TEST(TimingStepMachine, SeveralOptimizersEndTheStepWhenEachStepped) {
  FakeHost h;
  StepMachine m(timeline(), 2, &h);
  EXPECT_FALSE(train_step(m, h, {&opt_a, &opt_a}));  // the same one twice is one
  EXPECT_EQ(m.timeline().steps(), 0);
  EXPECT_TRUE(train_step(m, h, {&opt_b}));
  EXPECT_EQ(m.timeline().steps(), 1);
  EXPECT_TRUE(train_step(m, h, {&opt_b, &opt_a}));  // counting starts again after a step
  EXPECT_EQ(m.timeline().steps(), 2);
}

TEST(TimingStepMachine, NestedStepsAreOneBoundaryPair) {
  FakeHost h;
  StepMachine m(timeline(), 1, &h);
  h.running = {&call_1, &call_2};
  ASSERT_TRUE(m.forward_begin(false, 1, &call_1));
  ASSERT_TRUE(m.forward_end());
  EXPECT_EQ(m.optimizer_begin(&opt_a, &call_2), 1);
  EXPECT_EQ(m.optimizer_begin(&opt_a, &call_3), 0);  // super().step()
  EXPECT_EQ(m.optimizer_begin(&opt_b, &call_3), 0);  // another optimizer inside it
  EXPECT_FALSE(m.optimizer_end(&opt_b));
  EXPECT_FALSE(m.optimizer_end(&opt_a));
  EXPECT_EQ(m.timeline().steps(), 0);
  EXPECT_TRUE(m.optimizer_end(&opt_a));
  EXPECT_EQ(m.timeline().steps(), 1);
  EXPECT_TRUE(h.held.empty());
}

TEST(TimingStepMachine, ARaisedStepCountsAsTheOptimizersAndTheStepGoesOn) {
  FakeHost h;
  StepMachine m(timeline(), 1, &h);
  h.running = {&call_1};
  ASSERT_TRUE(m.forward_begin(false, 1, &call_1));
  ASSERT_TRUE(m.forward_end());
  h.running = {&call_2};
  ASSERT_EQ(m.optimizer_begin(&opt_a, &call_2), 1);
  EXPECT_EQ(h.held.size(), 2u);  // the optimizer and its call
  h.running.clear();             // it raised: no end comes
  EXPECT_TRUE(m.claim(true));    // the next boundary finds the call over
  EXPECT_TRUE(h.held.empty());
  EXPECT_EQ(m.timeline().steps(), 0);  // no step ended
  EXPECT_TRUE(m.step());
  EXPECT_EQ(m.timeline().steps(), 1);
  const Report r = m.timeline().report();
  EXPECT_EQ(r.phases[static_cast<int>(Phase::kOptimizer)].host.count, 1);
}

TEST(TimingStepMachine, AnInterruptedForwardEndsAtTheNextBoundary) {
  FakeHost h;
  StepMachine m(timeline(), 1, &h);
  h.running = {&call_1};
  ASSERT_TRUE(m.forward_begin(false, 1, &call_1));
  ASSERT_TRUE(m.forward_begin(false, 1, &call_2));  // nested: one forward
  h.running.clear();  // interrupted: neither end comes
  ASSERT_TRUE(m.forward_begin(false, 1, &call_3));  // the next step's forward
  EXPECT_EQ(h.held.count(&call_1), 0u);
  EXPECT_EQ(h.held.count(&call_3), 1u);
  h.running = {&call_3};
  EXPECT_TRUE(m.forward_end());
  EXPECT_FALSE(m.forward_end());  // nothing open
  const Report r = m.timeline().report();
  EXPECT_EQ(r.phases[static_cast<int>(Phase::kForward)].host.count, 2);  // the cut one closed too
}

TEST(TimingStepMachine, GlobalHooksIgnoreOtherModelsOptimizers) {
  FakeHost h;
  h.foreign = {&opt_c};
  StepMachine m(timeline(), 0, &h);
  h.running = {&call_2};
  EXPECT_EQ(m.optimizer_begin(&opt_c, &call_2), 0);  // not ours
  EXPECT_FALSE(m.optimizer_end(&opt_c));
  EXPECT_EQ(m.optimizer_begin(&opt_a, &call_2), 1);  // ours, but before the model ran: foreign
  EXPECT_FALSE(m.optimizer_end(&opt_a));
  EXPECT_EQ(m.timeline().steps(), 0);
  EXPECT_TRUE(train_step(m, h, {&opt_a}));
  EXPECT_EQ(m.timeline().steps(), 1);
  h.fail = true;
  EXPECT_EQ(m.optimizer_begin(&opt_b, &call_2), -1);
  EXPECT_TRUE(h.held.empty());
}

TEST(TimingStepMachine, AGlobalHookClosureOpensTheOptimizerAtItsForward) {
  FakeHost h;
  StepMachine m(timeline(), 0, &h);
  h.running = {&call_1, &call_2};
  ASSERT_EQ(m.optimizer_begin(&opt_a, &call_2), 1);  // LBFGS: no forward yet in the step
  ASSERT_TRUE(m.forward_begin(false, 2, &call_1));   // its closure runs the model
  ASSERT_TRUE(m.forward_end());
  m.timeline().backward_begin();
  m.timeline().backward_end();
  EXPECT_TRUE(m.optimizer_end(&opt_a));
  EXPECT_EQ(m.timeline().steps(), 1);
}

TEST(TimingStepMachine, OtherThreadsDoNotMoveTheStep) {
  FakeHost h;
  StepMachine m(timeline(), 1, &h);
  h.running = {&call_1};
  std::thread([&] {
    EXPECT_FALSE(m.on_training_thread());
    EXPECT_FALSE(m.forward_begin(true, 1, &call_1));  // an eval forward claims nothing: ignored
    EXPECT_FALSE(m.forward_end());
  }).join();
  ASSERT_TRUE(m.forward_begin(false, 1, &call_1));  // the making thread keeps the claim
  ASSERT_TRUE(m.forward_end());
  std::thread([&] {
    EXPECT_FALSE(m.forward_begin(false, 1, &call_1));  // claimed: ignored
    EXPECT_EQ(m.optimizer_begin(&opt_a, &call_2), 0);
    EXPECT_FALSE(m.step());
    EXPECT_FALSE(m.claim(true));
  }).join();
  EXPECT_TRUE(m.step());
}

TEST(TimingStepMachine, AnUnclaimedThreadCanBeTakenOver) {
  StepMachine m(timeline(), 1);  // the default host: calls end only at their end
  std::thread([&] {
    EXPECT_TRUE(m.forward_begin(false, 1, nullptr));  // the first training boundary claims it
    EXPECT_TRUE(m.on_training_thread());
    EXPECT_TRUE(m.forward_end());
    EXPECT_EQ(m.optimizer_begin(&opt_a, nullptr), 1);
    EXPECT_TRUE(m.optimizer_end(&opt_a));
  }).join();
  EXPECT_FALSE(m.on_training_thread());
  EXPECT_FALSE(m.step());
  EXPECT_EQ(m.timeline().steps(), 1);
}

TEST(TimingStepMachine, ReleaseAllGivesBackEveryToken) {
  FakeHost h;
  {
    StepMachine m(timeline(), 1, &h);
    h.running = {&call_2, &call_1};
    ASSERT_EQ(m.optimizer_begin(&opt_a, &call_2), 1);  // open: the step, and its closure's forward
    ASSERT_TRUE(m.forward_begin(false, 1, &call_1));
    EXPECT_EQ(h.held.size(), 3u);
    for (const void* t : m.held()) EXPECT_NE(t, nullptr);
    m.release_all();
    EXPECT_TRUE(h.held.empty());
    ASSERT_TRUE(m.forward_begin(false, 1, &call_3));  // the released calls are found over here
    EXPECT_EQ(h.held.size(), 1u);
  }
  EXPECT_TRUE(h.held.empty());  // and so does its destruction
}
