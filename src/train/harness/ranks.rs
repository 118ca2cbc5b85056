//! The harness's side of a distributed run ([`crate::distributed`]): where
//! the ranks meet around the steps. Before the first step every rank takes
//! rank 0's training state; a collective that failed inside a step ends the
//! run after it; a signal on any rank stops them all after the same step;
//! rank 0's state is copied to every rank before each checkpoint and after
//! the last step, and rank 0 alone saves. Without a distributed run, each
//! of these is what one process does.

use std::sync::atomic::Ordering;

use anyhow::Result;

use super::{Interrupts, Recipe};
use crate::distributed::{self, World};

/// This process's ranks, or none.
pub(super) struct Ranks(Option<&'static World>);

impl Ranks {
    /// Joins the ranks before the first step of `recipe`: its loss says how
    /// their gradients combine, and every rank starts from rank 0's state,
    /// as DDP's constructor broadcasts it.
    pub fn start<R: Recipe + ?Sized>(recipe: &R) -> Result<Ranks> {
        let ranks = Ranks(distributed::world());
        if let Some(world) = ranks.0 {
            world.set_reduction(recipe.loss_reduction());
        }
        ranks.replicate(recipe, "broadcast of rank 0's training state")?;
        Ok(ranks)
    }

    /// How many ranks train each step's global batch.
    pub fn size(&self) -> u64 {
        self.0.map_or(1, |w| w.size as u64)
    }

    /// Whether this rank writes checkpoints: rank 0, or the only process.
    pub fn saves(&self) -> bool {
        self.0.is_none_or(|w| w.rank == 0)
    }

    /// Before a step: a signal this rank had goes to all with the step.
    pub fn before_step(&self, interrupts: &Interrupts) {
        if let Some(world) = self.0 {
            if interrupts.stop.load(Ordering::SeqCst) {
                world.request_stop();
            }
        }
    }

    /// After a step: the error of a collective that failed in it.
    pub fn after_step(&self) -> Result<()> {
        match self.0.and_then(World::take_failure) {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// Whether the run stops after this step: a signal here, or on any rank
    /// in a distributed run.
    pub fn stop(&self, interrupts: &Interrupts) -> bool {
        match self.0 {
            Some(world) => world.stop_agreed(),
            None => interrupts.stop.load(Ordering::SeqCst),
        }
    }

    /// Copies rank 0's training state to every rank (`when` names it in an
    /// error).
    pub fn replicate<R: Recipe + ?Sized>(&self, recipe: &R, when: &str) -> Result<()> {
        match self.0 {
            Some(world) => world.broadcast(&recipe.replicated(), when),
            None => Ok(()),
        }
    }
}
