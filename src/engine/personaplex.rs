//! The PersonaPlex engine: the speech model behind the `Engine` trait. Personas are prefilled
//! once per (voice, role prompt) and restored into a slot when a session opens.

use super::persona::{Persona, PersonaCatalog, PromptCounter};
use super::{Engine, EngineError, EngineInfo, Opening, StageTimes, StepIo};
use crate::model::generate::{FORCED_CHUNK, SamplingConfig, Snapshot, rows_to_run};
use crate::model::persona::{VoicePrompt, prompt_calls};
use crate::model::pipeline::{Pipeline, PipelineState, Prefill, Stage};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Prefilled personas kept in memory: at most this many, and (but for the newest) this many
/// bytes of the model's device memory, which slot sizing leaves free for them.
const SNAPSHOT_CACHE_ENTRIES: usize = 32;
const SNAPSHOT_CACHE_BYTES: u64 = 2 << 30;

/// Options beyond the model itself.
#[derive(Debug, Clone)]
pub struct PersonaPlexOptions {
    pub slots: usize,
    pub sampling: SamplingConfig,
    /// Fixed seed for every session (reproducible runs); otherwise each session draws one.
    pub seed: Option<u64>,
    /// Shown in `/api/info` and logs.
    pub model_name: String,
}

type PersonaKey = (Option<String>, String);

pub struct PersonaPlexEngine {
    pipeline: Arc<Pipeline>,
    state: PipelineState,
    options: PersonaPlexOptions,
    snapshots: VecDeque<(PersonaKey, Arc<Snapshot>)>,
    /// Personas being prefilled between frames, oldest first.
    pending: VecDeque<PendingPersona>,
    /// How many of a prefill's model calls run at once, and how long that takes of late.
    prefill_pace: PrefillPace,
    sessions_opened: u64,
}

/// A persona being prefilled between frames, a batch of its model calls at a time
/// (`PrefillPace`), and the slots waiting for it: a prefill makes one call per prompt frame (60
/// to 100 for PersonaPlex's presets), which at once would stall every live conversation.
struct PendingPersona {
    key: PersonaKey,
    /// The checked voice and prompt tokens, until the prefill starts (at the queue's front:
    /// one prefill's state in memory at a time).
    prompt: Option<(VoicePrompt, Vec<u32>)>,
    prefill: Option<Prefill>,
    slots: Vec<usize>,
    started: Instant,
}

impl PendingPersona {
    /// Runs `calls` more model calls of the prefill (starting it first if need be); the
    /// snapshot once it is done.
    fn advance(
        &mut self,
        pipeline: &Pipeline,
        calls: usize,
    ) -> Result<Option<Snapshot>, EngineError> {
        if let Some((voice, tokens)) = self.prompt.take() {
            let prefill = pipeline.start_prefill(&voice, &tokens);
            self.prefill = Some(prefill.map_err(model_error)?);
        }
        let Some(prefill) = &mut self.prefill else {
            return Err(EngineError(
                "internal error: a prefill never started".into(),
            ));
        };
        let advanced = prefill.advance(&pipeline.lm, calls).map_err(model_error)?;
        // The batch's time is what it takes the device, not what it takes to queue it.
        pipeline.lm.device().synchronize().map_err(model_error)?;
        Ok(advanced)
    }
}

/// How many of a prefill's model calls run between two frames. The prompt's calls run through
/// the model together (`Generator::run_forced`): on a CPU a batch costs about the sum of its
/// calls, on a GPU little more than one of them (the weights are read once). So what each batch
/// size took is kept, and a size not yet timed is judged by the nearest timed ones: no longer
/// than a larger batch took, nor than a smaller one's time per call makes it. The batch shrinks
/// at once to the largest judged to end within the room before the next frame, and doubles
/// while the double is judged to.
#[derive(Debug, Clone, PartialEq)]
struct PrefillPace {
    /// A power of two, 1 to `FORCED_CHUNK`.
    calls: usize,
    /// What a batch of 2^i calls took of late; zero while untimed.
    took: [Duration; BATCH_SIZES],
}

/// The batch sizes a prefill runs: 1, 2, 4 … `FORCED_CHUNK`.
const BATCH_SIZES: usize = FORCED_CHUNK.trailing_zeros() as usize + 1;

impl Default for PrefillPace {
    fn default() -> Self {
        Self {
            calls: 8,
            took: [Duration::ZERO; BATCH_SIZES],
        }
    }
}

impl PrefillPace {
    /// How long a batch of `calls` is judged to take: zero while no size that bounds it was
    /// timed.
    fn judged(&self, calls: usize) -> Duration {
        let size = calls.trailing_zeros() as usize;
        if !self.took[size].is_zero() {
            return self.took[size];
        }
        let timed = |(_, took): &(usize, &Duration)| !took.is_zero();
        let larger = self.took[size + 1..].iter().find(|took| !took.is_zero());
        let smaller = self.took[..size].iter().enumerate().rev().find(timed);
        let by_smaller = smaller.map(|(smaller, took)| *took * (1 << (size - smaller)));
        match (larger, by_smaller) {
            (Some(&larger), Some(by_smaller)) => larger.min(by_smaller),
            (Some(&larger), None) => larger,
            (None, Some(by_smaller)) => by_smaller,
            (None, None) => Duration::ZERO,
        }
    }

    /// Whether a batch should run within `room`; when the current one is judged not to end
    /// within it, the batch shrinks to the largest that is.
    fn fits(&mut self, room: Duration) -> bool {
        if room.is_zero() {
            return false;
        }
        while self.calls > 1 && self.judged(self.calls) > room {
            self.calls /= 2;
        }
        self.judged(self.calls) <= room
    }

    /// The calls of progress made without room (`prepare`'s forced progress): the largest
    /// batch judged to take at most a quarter longer than one call, once one call was timed.
    /// On a GPU that is many calls for about the price of one; on a CPU, one.
    fn forced_calls(&self) -> usize {
        let one = self.took[0];
        if one.is_zero() {
            return 1;
        }
        (0..BATCH_SIZES)
            .rev()
            .map(|size| 1 << size)
            .find(|&calls| self.judged(calls) * 4 <= one * 5)
            .unwrap_or(1)
    }

    /// Records that a batch of `calls` (a power of two up to `FORCED_CHUNK`) took `took`,
    /// started with `room` left before its deadline.
    fn record(&mut self, calls: usize, took: Duration, room: Duration) {
        let kept = &mut self.took[calls.trailing_zeros() as usize];
        *kept = match kept.is_zero() {
            true => took,
            false => (*kept * 3 + took) / 4,
        };
        if calls == self.calls && calls < FORCED_CHUNK && self.judged(calls * 2) < room {
            self.calls *= 2;
        }
    }
}

/// Untimed warm-up frames per row bucket: a bucket's first frame captures its graphs (after
/// an eager run), the depformer's for a fresh slot's forcing; the next captures the depformer's
/// for a live frame's forcing (its graphs are keyed by the streams a frame forces) and replays
/// the rest.
const FRAMES_PER_BUCKET: usize = 2;

/// The warm-up's frames as (busy slots from 0, timed): for each row bucket an engine of
/// `slots` computes (`rows_to_run`), smallest first, `FRAMES_PER_BUCKET` untimed frames, then
/// `timed` timed ones. Timing a capture would set the output phase, and with it every
/// session's latency, to a cost no served frame pays.
fn warm_up_schedule(slots: usize, timed: usize) -> Vec<(usize, bool)> {
    let busy_first = |busy: usize| (0..slots).map(|slot| slot < busy).collect::<Vec<_>>();
    let mut buckets: Vec<usize> = (1..=slots)
        .map(|busy| rows_to_run(&busy_first(busy)))
        .collect();
    buckets.dedup();
    buckets
        .into_iter()
        .flat_map(|bucket| {
            let untimed = std::iter::repeat_n((bucket, false), FRAMES_PER_BUCKET);
            untimed.chain(std::iter::repeat_n((bucket, true), timed))
        })
        .collect()
}

/// What the warm-up measured: the slowest timed step of each row bucket, as (sessions busy,
/// step), smallest first; the last is the whole engine.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmUp {
    pub buckets: Vec<(usize, Duration)>,
}

impl WarmUp {
    /// The whole engine's slowest step.
    pub fn slowest(&self) -> Duration {
        self.buckets
            .last()
            .map_or(Duration::ZERO, |&(_, step)| step)
    }

    /// The most sessions whose step stays within `budget`, and that step; `None` when not even
    /// the smallest bucket does.
    pub fn sessions_within(&self, budget: Duration) -> Option<(usize, Duration)> {
        self.buckets
            .iter()
            .rev()
            .find(|&&(_, step)| step <= budget)
            .copied()
    }

    /// How many of `asked` sessions to admit so each step stays within `budget`: all of them
    /// with `overload`, else the most that keep it (at least one), with the slowest step they
    /// take (what places the output phase).
    pub fn admit(&self, asked: usize, budget: Duration, overload: bool) -> Admission {
        let within = self.sessions_within(budget);
        let (sessions, slowest_step) = match within {
            Some((fit, step)) if fit >= asked => (asked, step),
            _ if overload => (asked, self.slowest()),
            Some(fit) => fit,
            None => self.buckets.first().copied().unwrap_or((1, Duration::ZERO)),
        };
        let sessions = sessions.min(asked);
        Admission {
            sessions,
            slowest_step,
            real_time: within.is_some_and(|(fit, _)| fit >= sessions),
        }
    }
}

/// What `WarmUp::admit` decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Admission {
    pub sessions: usize,
    pub slowest_step: Duration,
    /// Whether that many sessions keep within the budget.
    pub real_time: bool,
}

/// Drops the oldest (last) of `entries` while there are more than `most` or, but for the
/// newest, they hold more than `most_bytes`.
fn keep_within<T>(
    entries: &mut VecDeque<T>,
    most: usize,
    most_bytes: u64,
    bytes: impl Fn(&T) -> u64,
) {
    entries.truncate(most);
    while entries.len() > 1 && entries.iter().map(&bytes).sum::<u64>() > most_bytes {
        entries.pop_back();
    }
}

/// What a model without a tokenizer (`Pipeline::random`) tells its users.
const RANDOM_WEIGHTS: &str = "random weights, for measuring: no tokenizer, so no role prompt and no text, and the agent's audio is noise";

/// Counts a role prompt's tokens the way the engine will feed them.
struct TokenCounter(Arc<Pipeline>);

impl PromptCounter for TokenCounter {
    fn count(&self, prompt: &str) -> usize {
        self.0
            .prompt_tokens(prompt)
            .map(|t| t.len())
            .unwrap_or(usize::MAX)
    }
}

impl PersonaPlexEngine {
    /// Builds the engine with as many of `options.slots` conversations as the device's free
    /// memory holds (each keeps a whole attention window: 1.6 GB in bf16 for the 7B).
    pub fn new(pipeline: Pipeline, mut options: PersonaPlexOptions) -> Result<Self, EngineError> {
        options.slots = slots_that_fit(&pipeline, options.slots)?;
        let state = pipeline.state(options.slots).map_err(model_error)?;
        // The engine moves to the step loop's thread; on a GPU each thread has its own default
        // stream, so the weights' and state's uploads must be finished before it goes.
        pipeline.lm.device().synchronize().map_err(model_error)?;
        Ok(Self {
            pipeline: Arc::new(pipeline),
            state,
            options,
            snapshots: VecDeque::new(),
            pending: VecDeque::new(),
            prefill_pace: PrefillPace::default(),
            sessions_opened: 0,
        })
    }

    /// Prefills `persona` (the default one) and runs silent frames (`warm_up_schedule`) in
    /// every row bucket: untimed ones first, which capture its CUDA graphs on a GPU so no
    /// session's frame pays for a capture, then `frames` timed ones. Returns each bucket's
    /// slowest timed step (a step computes only the slots up to the last busy one): what sets
    /// the output phase, and how many sessions keep real time.
    pub fn warm_up(&mut self, persona: &Persona, frames: usize) -> Result<WarmUp, EngineError> {
        let slots = self.options.slots;
        for slot in 0..slots {
            self.open_slot(slot, persona)?;
        }
        let far = Instant::now() + Duration::from_secs(24 * 3600);
        while !self.pending.is_empty() {
            for (_, opened) in self.prepare(far, true) {
                opened?;
            }
        }
        let input = vec![0.0; slots * crate::audio::FRAME_SAMPLES];
        let mut output = vec![0.0; slots * crate::audio::FRAME_SAMPLES];
        let mut buckets: Vec<(usize, Duration)> = Vec::new();
        for (busy, timed) in warm_up_schedule(slots, frames) {
            let active: Vec<bool> = (0..slots).map(|slot| slot < busy).collect();
            let started = Instant::now();
            let mut text = Vec::new();
            self.step(StepIo {
                active: &active,
                input: &input,
                output: &mut output,
                text: &mut text,
            })?;
            if timed {
                let took = started.elapsed();
                match buckets.last_mut() {
                    Some((bucket, slowest)) if *bucket == busy => *slowest = (*slowest).max(took),
                    _ => buckets.push((busy, took)),
                }
            }
        }
        (0..slots).for_each(|slot| self.close_slot(slot));
        // As in `new`: the prefill snapshots were made on this thread's stream.
        self.pipeline
            .lm
            .device()
            .synchronize()
            .map_err(model_error)?;
        Ok(WarmUp { buckets })
    }

    /// Frames the prompt budget allows: the whole prompt must fit the attention window.
    fn max_prompt_tokens(&self) -> usize {
        self.pipeline.max_prompt_tokens(None)
    }

    /// The prefilled state of `key`, if kept (and now the most recently used).
    fn cached(&mut self, key: &PersonaKey) -> Option<Arc<Snapshot>> {
        let idx = self.snapshots.iter().position(|(k, _)| k == key)?;
        let entry = self.snapshots.remove(idx)?;
        let snapshot = entry.1.clone();
        self.snapshots.push_front(entry);
        Some(snapshot)
    }

    /// The voice and prompt tokens of `persona`, its role prompt checked against the window.
    fn checked_prompt(&self, persona: &Persona) -> Result<(VoicePrompt, Vec<u32>), EngineError> {
        let voice = match &persona.voice {
            Some(name) => self.pipeline.voice_preset(name).map_err(model_error)?,
            None => VoicePrompt::None,
        };
        let tokens = self
            .pipeline
            .prompt_tokens(&persona.prompt)
            .map_err(model_error)?;
        let limit = self.pipeline.max_prompt_tokens(Some(&voice));
        if tokens.len() > limit {
            return Err(EngineError(format!(
                "role prompt is {} tokens; the limit is {limit}",
                tokens.len()
            )));
        }
        Ok((voice, tokens))
    }

    /// Starts slot `slot_idx` from a prefilled persona.
    fn start_slot(&mut self, slot_idx: usize, snapshot: &Snapshot) -> Result<(), EngineError> {
        let seed = self.next_seed();
        self.state
            .open(slot_idx, snapshot, seed, self.options.sampling)
            .map_err(model_error)
    }

    /// Keeps a finished prefill and starts the slots that waited for it.
    fn finish(
        &mut self,
        done: PendingPersona,
        snapshot: Snapshot,
    ) -> Vec<(usize, Result<(), EngineError>)> {
        let ms = done.started.elapsed().as_millis() as u64;
        tracing::info!(voice = ?done.key.0, ms, "persona prefilled");
        let snapshot = Arc::new(snapshot);
        self.snapshots.push_front((done.key, snapshot.clone()));
        keep_within(
            &mut self.snapshots,
            SNAPSHOT_CACHE_ENTRIES,
            SNAPSHOT_CACHE_BYTES,
            |(_, s)| s.bytes(),
        );
        let slots = done.slots.into_iter();
        slots
            .map(|slot| (slot, self.start_slot(slot, &snapshot)))
            .collect()
    }

    fn next_seed(&mut self) -> u64 {
        self.sessions_opened += 1;
        match self.options.seed {
            Some(seed) => seed,
            None => rand::random(),
        }
    }
}

/// `requested` slots, or as many as the free memory holds besides, on a GPU, the kept personas
/// and one prefill (at most a slot's state); an error when not even one fits. (On the CPU they
/// live in the host's memory, which the kernel can page.)
fn slots_that_fit(pipeline: &Pipeline, requested: usize) -> Result<usize, EngineError> {
    let device = pipeline.lm.device();
    let free = crate::model::memory::available(device).map_err(model_error)?;
    let personas = match device.is_cuda() {
        true => SNAPSHOT_CACHE_BYTES + pipeline.slot_state_bytes(),
        false => 0,
    };
    let fit = pipeline.slots_that_fit(free.saturating_sub(personas));
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    let per_slot = pipeline.slot_state_bytes();
    if fit == 0 {
        return Err(EngineError(format!(
            "not enough memory for one conversation: its state needs {:.2} GiB, prefilled personas \
             {:.2} GiB more, and {:.2} GiB are free on {device:?}",
            gib(per_slot),
            gib(personas),
            gib(free)
        )));
    }
    if fit < requested {
        tracing::warn!(
            requested,
            serving = fit,
            per_slot_gib = gib(per_slot),
            free_gib = gib(free),
            "fewer conversations at once than asked: that many fit the free memory"
        );
    }
    Ok(requested.min(fit))
}

fn model_error(err: candle_core::Error) -> EngineError {
    EngineError(err.to_string())
}

impl Engine for PersonaPlexEngine {
    fn info(&self) -> EngineInfo {
        let voices = self.pipeline.voices.names();
        let default_voice = voices
            .iter()
            .find(|v| *v == "NATF0")
            .or(voices.first())
            .cloned();
        let mut catalog = PersonaCatalog::with_voices(voices, default_voice).limit_prompt_tokens(
            self.max_prompt_tokens(),
            Arc::new(TokenCounter(self.pipeline.clone())),
        );
        let random = !self.pipeline.reads_prompts();
        if random {
            catalog = catalog.without_prompts(RANDOM_WEIGHTS);
        }
        let notices = [
            random.then_some(RANDOM_WEIGHTS),
            self.pipeline.lm.device().is_cpu().then_some(
                "PersonaPlex runs on the CPU here (no GPU this build can use): replies may lag",
            ),
        ];
        let notice: Vec<&str> = notices.into_iter().flatten().collect();
        EngineInfo {
            name: "personaplex",
            model: Some(self.options.model_name.clone()),
            delay_frames: 1,
            notice: (!notice.is_empty()).then(|| notice.join("; ")),
            catalog,
        }
    }

    fn slots(&self) -> usize {
        self.options.slots
    }

    fn open_slot(&mut self, slot_idx: usize, persona: &Persona) -> Result<Opening, EngineError> {
        let key = (persona.voice.clone(), persona.prompt.clone());
        if let Some(snapshot) = self.cached(&key) {
            self.start_slot(slot_idx, &snapshot)?;
            return Ok(Opening::Ready);
        }
        if let Some(pending) = self.pending.iter_mut().find(|p| p.key == key) {
            pending.slots.push(slot_idx);
            return Ok(Opening::Preparing);
        }
        let (voice, tokens) = self.checked_prompt(persona)?;
        tracing::info!(voice = ?persona.voice, calls = prompt_calls(&voice, &tokens), "prefilling a persona between frames");
        self.pending.push_back(PendingPersona {
            key,
            prompt: Some((voice, tokens)),
            prefill: None,
            slots: vec![slot_idx],
            started: Instant::now(),
        });
        Ok(Opening::Preparing)
    }

    fn prepare(
        &mut self,
        deadline: Instant,
        must_progress: bool,
    ) -> Vec<(usize, Result<(), EngineError>)> {
        let mut ended = Vec::new();
        let mut forced = must_progress;
        while let Some(pending) = self.pending.front_mut() {
            let started = Instant::now();
            let room = deadline.saturating_duration_since(started);
            let calls = match (self.prefill_pace.fits(room), std::mem::take(&mut forced)) {
                (true, _) => self.prefill_pace.calls,
                (false, true) => self.prefill_pace.forced_calls(),
                (false, false) => break,
            };
            let advanced = pending.advance(&self.pipeline, calls);
            match advanced {
                Ok(None) => self.prefill_pace.record(calls, started.elapsed(), room),
                Ok(Some(snapshot)) => {
                    let done = self
                        .pending
                        .pop_front()
                        .expect("the front was just advanced");
                    ended.extend(self.finish(done, snapshot));
                }
                Err(why) => {
                    let failed = self
                        .pending
                        .pop_front()
                        .expect("the front was just advanced");
                    tracing::warn!(voice = ?failed.key.0, %why, "prefilling a persona failed");
                    ended.extend(
                        failed
                            .slots
                            .into_iter()
                            .map(|slot| (slot, Err(why.clone()))),
                    );
                }
            }
        }
        ended
    }

    fn close_slot(&mut self, slot_idx: usize) {
        for pending in &mut self.pending {
            pending.slots.retain(|&slot| slot != slot_idx);
        }
        // A prefill no slot waits for any more stops.
        self.pending.retain(|pending| !pending.slots.is_empty());
        self.state.close(slot_idx);
    }

    fn step(&mut self, io: StepIo<'_>) -> Result<StageTimes, EngineError> {
        let mut times = StageTimes::default();
        let mut last = Instant::now();
        let mut mark = |stage: Stage| {
            let now = Instant::now();
            let spent = now - last;
            last = now;
            match stage {
                Stage::Encode => times.encode = spent,
                Stage::Temporal => times.temporal = spent,
                Stage::Depformer => times.depformer = spent,
                Stage::Decode => times.decode = spent,
            }
        };
        let frames = self
            .state
            .step(
                self.pipeline.models(),
                io.input,
                io.active,
                io.output,
                &mut mark,
            )
            .map_err(model_error)?;
        for (slot_idx, frame) in frames.iter().enumerate() {
            let Some(text) = frame.as_ref().and_then(|f| f.tokens).map(|t| t[0]) else {
                continue;
            };
            if let Some(piece) = self.pipeline.text_piece(text as u32) {
                io.text.push((slot_idx, piece));
            }
        }
        Ok(times)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warm_up_times_every_row_bucket_after_its_untimed_frames() {
        let schedule = warm_up_schedule(6, 1);
        // rows_to_run(busy slots): 1 → 1, 2 → 2, 3..4 → 4, 5..6 → 6 (the engine's size).
        let (u, t) = (false, true);
        assert_eq!(
            schedule,
            [
                (1, u),
                (1, u),
                (1, t),
                (2, u),
                (2, u),
                (2, t),
                (4, u),
                (4, u),
                (4, t),
                (6, u),
                (6, u),
                (6, t)
            ]
        );
        assert_eq!(
            warm_up_schedule(1, 2),
            [(1, false), (1, false), (1, true), (1, true)]
        );
    }

    /// A warm-up whose steps pass 70 ms beyond 4 sessions at once.
    fn measured() -> WarmUp {
        let ms = Duration::from_millis;
        let steps = [(1, 30), (2, 35), (4, 52), (8, 90), (16, 170)];
        WarmUp {
            buckets: steps.map(|(busy, step)| (busy, ms(step))).to_vec(),
        }
    }

    #[test]
    fn the_sessions_within_a_budget_are_the_largest_bucket_that_keeps_it() {
        let ms = Duration::from_millis;
        let warm = measured();
        assert_eq!(warm.slowest(), ms(170));
        assert_eq!(warm.sessions_within(ms(70)), Some((4, ms(52))));
        assert_eq!(warm.sessions_within(ms(200)), Some((16, ms(170))));
        assert_eq!(warm.sessions_within(ms(20)), None);
        assert_eq!(
            WarmUp {
                buckets: Vec::new()
            }
            .sessions_within(ms(70)),
            None
        );
    }

    #[test]
    fn only_the_sessions_that_keep_real_time_are_admitted_unless_overloaded() {
        let ms = Duration::from_millis;
        let warm = measured();
        let admission = |asked, budget, overload| {
            let a = warm.admit(asked, ms(budget), overload);
            (a.sessions, a.slowest_step, a.real_time)
        };
        assert_eq!(admission(16, 70, false), (4, ms(52), true));
        assert_eq!(admission(16, 70, true), (16, ms(170), false));
        assert_eq!(admission(16, 200, false), (16, ms(170), true));
        // Fewer asked than fit: as asked, with the slowest step of the sessions that fit.
        assert_eq!(admission(3, 70, false), (3, ms(52), true));
        // Not even one session keeps it: one, which at least burdens nobody else.
        assert_eq!(admission(16, 20, false), (1, ms(30), false));
        assert_eq!(admission(16, 20, true), (16, ms(170), false));
    }

    /// Frames of a busy engine as the engine paces a prefill between them: `rooms` is the room
    /// each frame leaves, `cost` what a batch of so many calls takes; every eighth frame must
    /// progress (one call without room). Returns the calls made and the batches that ran past
    /// their room, over the frames from `from` on.
    fn paced(
        pace: &mut PrefillPace,
        rooms: &[Duration],
        cost: impl Fn(usize) -> Duration,
        from: usize,
    ) -> (usize, usize) {
        let (mut calls, mut overruns) = (0, 0);
        for (frame, &room) in rooms.iter().enumerate() {
            let batch = match (pace.fits(room), frame % 8 == 7) {
                (true, _) => pace.calls,
                (false, true) => pace.forced_calls(),
                (false, false) => continue,
            };
            let took = cost(batch);
            pace.record(batch, took, room);
            if frame >= from {
                calls += batch;
                overruns += usize::from(took > room);
            }
        }
        (calls, overruns)
    }

    /// A prefill's batch grows while it is judged to end inside the room, up to a forward's
    /// most, and when the room shrinks it shrinks at once to a batch that ends inside it, on a
    /// GPU (a batch costs about one call) and on a CPU (about the sum of its calls) alike.
    #[test]
    fn a_prefill_batch_grows_into_the_room_and_shrinks_to_fit_without_running_late() {
        let ms = Duration::from_micros;
        let gpu = |calls: usize| ms(10_000 + 100 * calls as u64);
        let cpu = |calls: usize| ms(3_000 * calls as u64);
        let rooms: Vec<_> = [ms(60_000); 10]
            .into_iter()
            .chain([ms(12_000); 30])
            .collect();

        let mut pace = PrefillPace::default();
        paced(&mut pace, &rooms[..10], gpu, 0);
        assert_eq!(
            pace.calls, FORCED_CHUNK,
            "a GPU's batch grows to a forward's most"
        );
        let (calls, overruns) = paced(&mut pace, &rooms[10..], gpu, 0);
        assert_eq!(overruns, 0, "no batch runs past its room: {pace:?}");
        assert_eq!(
            pace.calls, 16,
            "the largest batch that ends in 12 ms (11.6 ms)"
        );
        assert!(
            calls >= 16 * 29,
            "it keeps going at that size: {calls} calls"
        );

        let mut pace = PrefillPace::default();
        paced(&mut pace, &rooms[..10], cpu, 0);
        assert_eq!(pace.calls, 16, "a CPU's batch stops growing before 96 ms");
        let (calls, overruns) = paced(&mut pace, &rooms[10..], cpu, 0);
        assert_eq!(overruns, 0, "no batch runs past its room: {pace:?}");
        assert!(
            pace.calls >= 2 && calls >= 2 * 20,
            "it keeps going once a small batch was timed: {calls} calls, {pace:?}"
        );

        let mut pace = PrefillPace::default();
        assert!(!pace.fits(ms(0)), "no room at all");
        assert_eq!(pace.calls, 8, "a frame without room changes nothing");
        assert!(
            pace.fits(ms(1)),
            "an untimed batch runs where there is room"
        );
        pace.record(8, ms(30_000), ms(1));
        assert!(!pace.fits(ms(20_000)));
        assert_eq!(pace.calls, 1, "the smallest batch is still one call");
    }

    /// With no room between frames a prefill still makes progress every eighth frame: one call
    /// until one call was timed, then on a GPU the largest batch costing about as much (here 16
    /// calls for 11.6 ms against 10.1 ms), on a CPU one call.
    #[test]
    fn progress_without_room_takes_as_many_calls_as_one_costs() {
        let ms = Duration::from_micros;
        let gpu = |calls: usize| ms(10_000 + 100 * calls as u64);
        let cpu = |calls: usize| ms(3_000 * calls as u64);
        let warm = [ms(60_000); 10];
        let busy = [Duration::ZERO; 64];

        let mut pace = PrefillPace::default();
        paced(&mut pace, &warm, gpu, 0);
        assert_eq!(pace.forced_calls(), 1, "one call was never timed");
        let (calls, _) = paced(&mut pace, &busy, gpu, 0);
        assert_eq!(pace.forced_calls(), 16);
        assert_eq!(calls, 1 + 7 * 16, "8 forced frames, the first of one call");

        let mut pace = PrefillPace::default();
        paced(&mut pace, &warm, cpu, 0);
        let (calls, _) = paced(&mut pace, &busy, cpu, 0);
        assert_eq!(
            (pace.forced_calls(), calls),
            (1, 8),
            "a CPU's batch costs its calls"
        );
    }

    #[test]
    fn kept_personas_stay_within_their_count_and_bytes_but_the_newest_stays() {
        let kept = |sizes: &[u64], most, most_bytes| {
            let mut entries: VecDeque<u64> = sizes.iter().copied().collect();
            keep_within(&mut entries, most, most_bytes, |&size| size);
            Vec::from(entries)
        };
        assert_eq!(kept(&[1, 2, 3, 4], 3, 100), [1, 2, 3]);
        assert_eq!(kept(&[5, 4, 3], 10, 9), [5, 4]);
        assert_eq!(kept(&[50, 1], 10, 9), [50], "the newest, however big");
    }
}
