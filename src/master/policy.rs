//! What each signal means in each phase of the master's life: a plain function, so the whole
//! signal table is unit-tested without forking anything.

use nix::sys::signal::Signal;

/// The master's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The first generation is starting; not every worker has booted yet.
    Booting,
    /// Serving.
    Running,
    /// Stopping gracefully: workers finish in-flight requests.
    Draining,
    /// Stopping now.
    Halting,
}

/// What the loop does about one signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// HUP: re-read the config and start a new generation.
    Reload,
    /// TERM, QUIT: stop accepting, let in-flight requests finish.
    StopGracefully,
    /// INT (or a second stop signal while draining): stop now.
    StopQuickly,
    /// TTIN: one worker more.
    AddWorker,
    /// TTOU: one worker less (never below one).
    RemoveWorker,
    /// USR1: reopen log files, in the master and every worker.
    ReopenLogs,
    /// USR2: re-execute the binary on disk, handing it the listeners.
    Upgrade,
    /// CHLD: a worker exited; the loop reaps every turn anyway.
    Reap,
    /// Nothing to do; the text says why, for the log.
    Ignore(&'static str),
}

/// The signal table.
pub fn action_for(phase: Phase, signal: Signal) -> Action {
    use Action::*;
    use Phase::*;
    match (phase, signal) {
        (_, Signal::SIGCHLD) => Reap,
        (Halting, _) => Ignore("already stopping"),
        (_, Signal::SIGINT) => StopQuickly,
        (Draining, Signal::SIGTERM | Signal::SIGQUIT) => StopQuickly,
        (_, Signal::SIGTERM | Signal::SIGQUIT) => StopGracefully,
        (Draining, _) => Ignore("draining for shutdown"),
        (_, Signal::SIGUSR1) => ReopenLogs,
        (Booting, Signal::SIGHUP) => Ignore("the first generation has not booted yet"),
        (_, Signal::SIGHUP) => Reload,
        (_, Signal::SIGTTIN) => AddWorker,
        (_, Signal::SIGTTOU) => RemoveWorker,
        (Booting, Signal::SIGUSR2) => Ignore("the first generation has not booted yet"),
        (_, Signal::SIGUSR2) => Upgrade,
        (_, Signal::SIGWINCH) => Ignore("WINCH is only meaningful when daemonized"),
        _ => Ignore("not a signal ragpool handles"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;

    #[test]
    fn gunicorn_signal_table_while_running() {
        let p = Phase::Running;
        assert_eq!(action_for(p, Signal::SIGHUP), Reload);
        assert_eq!(action_for(p, Signal::SIGTERM), StopGracefully);
        assert_eq!(action_for(p, Signal::SIGQUIT), StopGracefully);
        assert_eq!(action_for(p, Signal::SIGINT), StopQuickly);
        assert_eq!(action_for(p, Signal::SIGTTIN), AddWorker);
        assert_eq!(action_for(p, Signal::SIGTTOU), RemoveWorker);
        assert_eq!(action_for(p, Signal::SIGUSR1), ReopenLogs);
        assert_eq!(action_for(p, Signal::SIGUSR2), Upgrade);
        assert_eq!(action_for(p, Signal::SIGCHLD), Reap);
    }

    #[test]
    fn a_second_stop_signal_escalates() {
        assert_eq!(action_for(Phase::Draining, Signal::SIGTERM), StopQuickly);
        assert_eq!(action_for(Phase::Draining, Signal::SIGINT), StopQuickly);
        assert!(matches!(
            action_for(Phase::Halting, Signal::SIGINT),
            Ignore(_)
        ));
    }

    #[test]
    fn nothing_but_stopping_happens_while_draining() {
        for s in [
            Signal::SIGHUP,
            Signal::SIGTTIN,
            Signal::SIGTTOU,
            Signal::SIGUSR2,
        ] {
            assert!(matches!(action_for(Phase::Draining, s), Ignore(_)), "{s}");
        }
    }

    #[test]
    fn reload_waits_for_the_first_generation() {
        assert!(matches!(
            action_for(Phase::Booting, Signal::SIGHUP),
            Ignore(_)
        ));
        assert_eq!(action_for(Phase::Booting, Signal::SIGTERM), StopGracefully);
    }
}
