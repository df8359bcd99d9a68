// The step rule above the Timeline: which hook calls are boundaries of the training step, for a
// loop that reports them from hooks (the Monitor's, step_hooks.cpp) rather than by hand.
//
//  - Optimizers. An optimizer step's begin and end are one boundary pair at its outermost call: a
//    subclass whose step() calls super().step() reports nested pairs, and another optimizer
//    stepping inside an open step (its closure) is part of that step. With `optimizers` > 1 the
//    step ends when that many distinct optimizers stepped; with 0 or 1 every outermost step ends
//    it. With 0 (global hooks: every optimizer in the process is seen) an optimizer that the host
//    says is not this model's (StepHost::owns) is ignored, and one stepping before the model ran
//    in the step (Timeline::forward_seen) is another model's unless its closure then runs the
//    model (LBFGS): it opens the optimizer boundary at that closure's first training forward.
//  - Calls that never returned. A forward interrupted (KeyboardInterrupt) or an optimizer step that
//    raised reports no end. The outermost open forward and optimizer step keep the token of the
//    call that opened them; a later boundary asks the host whether that call still runs
//    (StepHost::live), and if not ends it here: the forward's time runs to here, the raised step's
//    time counts as the optimizer's and the step goes on (no step ends).
//  - Threads. The training thread is the first to report a training boundary (a training forward,
//    an optimizer step, step() or a marked boundary); until one has, the thread that made the
//    machine. Forwards, optimizer steps and step() on any other thread are ignored, so that a
//    background evaluator calling the same model does not move the training step. Backward
//    boundaries go to the Timeline directly, from whichever thread autograd runs them on.
// The Timeline below turns the boundaries into the step's partition (closures, eval pauses:
// timing/timeline.h). Not thread-safe: the caller serialises calls (Python: the GIL).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "timing/timeline.h"

namespace stepscope::timing {

// What the machine asks of its caller. Tokens are identities (an optimizer, a call's frame) that
// the machine compares and hands back, never dereferences. The defaults suit a C++ loop: calls
// are over only at their end, nothing is kept alive, every optimizer is the model's.
class StepHost {
 public:
  using Token = const void*;
  virtual ~StepHost() = default;
  // Whether the call opened with token `call` still runs on the calling thread.
  virtual bool live(Token call) { return true; }
  // The machine keeps `t` from hold(t) to release(t): keep it alive, so that its identity is not
  // reused by another object meanwhile.
  virtual void hold(Token t) {}
  virtual void release(Token t) {}
  // Global optimizer hooks (optimizers = 0): whether `opt` holds the model's parameters: 1 yes,
  // 0 no, -1 the host failed (optimizer_begin returns -1 and the host reports its error).
  virtual int owns(Token opt) { return 1; }
};

class StepMachine {
 public:
  using Token = StepHost::Token;
  // host: null for StepHost's defaults; otherwise it must outlive the machine.
  StepMachine(std::shared_ptr<Timeline> tl, size_t optimizers, StepHost* host = nullptr);
  ~StepMachine();
  StepMachine(const StepMachine&) = delete;
  StepMachine& operator=(const StepMachine&) = delete;

  Timeline& timeline() const { return *tl_; }
  const std::shared_ptr<Timeline>& timeline_ptr() const { return tl_; }
  // Whether the calling thread is the training thread (checks only; claims nothing).
  bool on_training_thread() const { return std::this_thread::get_id() == thread_; }
  // Whether a training boundary on the calling thread would be the training thread's (it is, or none is claimed).
  bool would_train() const { return on_training_thread() || !thread_claimed_; }

  // A forward begins (eval: no grad, inference mode or eval(); batch: samples, < 0 unknown);
  // call: the token of the call it runs in. false: ignored (another thread's).
  bool forward_begin(bool eval, int64_t batch, Token call);
  // A forward ends; false when no forward begun here is open on this thread.
  bool forward_end();
  // An optimizer step begins: 1 a boundary, 0 ignored (another thread, a nested call, another
  // model's optimizer), -1 StepHost::owns failed.
  int optimizer_begin(Token opt, Token call);
  // An optimizer step ends; true when it ended the training step.
  bool optimizer_end(Token opt);
  // Whether optimizer_end(opt) now would close the outermost step opened by optimizer_begin.
  bool closing(Token opt) const { return opt_in_ == opt && opt_depth_ == 1 && on_training_thread(); }

  // Boundaries marked by hand. claim: ends the calls that are over and says whether the calling
  // thread is the training thread (a training boundary claims it while none has). The others end
  // the step (an optimizer end; step(): where no optimizer hook does) and say whether one ended.
  bool claim(bool training);
  bool optimizer_end_marked();
  bool step();

  // The tokens held now (null where none), for a garbage collector's traversal, and giving them
  // all back (its clear): the calls they opened are then over at the next boundary that asks
  // StepHost::live(nullptr).
  std::array<Token, 3> held() const { return {opt_in_, opt_frame_, fwd_frame_}; }
  void release_all();

 private:
  bool claim_thread(bool training);
  void settle();            // ends the open calls the host says are over
  void end_raised_step();   // an optimizer step whose end never came
  void keep(Token& slot, Token t);
  void drop(Token& slot);
  void ended() { stepped_.clear(); }

  std::shared_ptr<Timeline> tl_;
  StepHost default_host_;
  StepHost* host_;
  size_t n_opts_;                 // optimizers given; 0 or 1: every outermost step ends the step
  std::vector<Token> stepped_;    // distinct optimizers that stepped in this step (identities only)
  Token opt_in_ = nullptr;        // the optimizer inside its step (held) ...
  int opt_depth_ = 0;             // ... its nesting ...
  Token opt_frame_ = nullptr;     // ... and the call that opened the outermost step (held)
  bool opt_foreign_ = false;      // global hooks: stepping before the model ran in the step
  int fwd_depth_ = 0;             // forwards open on the training thread (nested ones included)
  Token fwd_frame_ = nullptr;     // the call that opened the outermost one (held)
  std::thread::id thread_;        // the training thread
  bool thread_claimed_ = false;
};

}  // namespace stepscope::timing
