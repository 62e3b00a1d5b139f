//! The echo engine: returns each session's input a fixed number of frames later, through the
//! exact path the model uses. It also reports each utterance it heard as a text piece, so the
//! text path is exercised end to end without a model.

use super::{
    Engine, EngineError, EngineInfo, Opening, Persona, PersonaCatalog, StageTimes, StepIo,
};
use crate::audio::{FRAME_MS, FRAME_SAMPLES, signal};

/// Frame RMS above which the echo engine counts a frame as speech.
const SPEECH_RMS: f32 = 0.01;
/// Quiet frames that end an utterance.
const PAUSE_FRAMES: usize = 3;

struct EchoSlot {
    /// `delay_frames` frames of past input, oldest first from `read_idx`.
    history: Vec<f32>,
    read_idx: usize,
    speech_frames: usize,
    quiet_frames: usize,
}

impl EchoSlot {
    fn new(delay_frames: usize) -> Self {
        Self {
            history: vec![0.0; delay_frames * FRAME_SAMPLES],
            read_idx: 0,
            speech_frames: 0,
            quiet_frames: 0,
        }
    }

    fn reset(&mut self) {
        self.history.fill(0.0);
        self.read_idx = 0;
        self.speech_frames = 0;
        self.quiet_frames = 0;
    }

    /// Writes the frame from `delay_frames` ago to `output` and stores `input` in its place.
    fn delay(&mut self, input: &[f32], output: &mut [f32]) {
        if self.history.is_empty() {
            output.copy_from_slice(input);
            return;
        }
        let stored = &mut self.history[self.read_idx..self.read_idx + FRAME_SAMPLES];
        output.copy_from_slice(stored);
        stored.copy_from_slice(input);
        self.read_idx = (self.read_idx + FRAME_SAMPLES) % self.history.len();
    }

    /// Tracks speech in `input`; returns the length of an utterance that just ended.
    fn utterance_ended(&mut self, input: &[f32]) -> Option<usize> {
        if signal::rms(input) > SPEECH_RMS {
            self.speech_frames += 1;
            self.quiet_frames = 0;
            return None;
        }
        self.quiet_frames += 1;
        if self.speech_frames > 0 && self.quiet_frames >= PAUSE_FRAMES {
            return Some(std::mem::take(&mut self.speech_frames));
        }
        None
    }
}

/// Echoes every session back after `delay_frames` frames.
pub struct EchoEngine {
    slots: Vec<EchoSlot>,
    delay_frames: usize,
    catalog: PersonaCatalog,
}

impl EchoEngine {
    pub fn new(slots: usize, delay_frames: usize) -> Self {
        Self {
            slots: (0..slots).map(|_| EchoSlot::new(delay_frames)).collect(),
            delay_frames,
            catalog: PersonaCatalog::builtin(),
        }
    }
}

impl Engine for EchoEngine {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            name: "echo",
            model: None,
            delay_frames: self.delay_frames,
            notice: Some(format!(
                "Echo engine: no speech model is loaded, so you hear yourself back ({} ms of engine delay \
                 plus the frame and the network, about 0.2 s in all). Serve PersonaPlex with \
                 `duplex serve --model-dir DIR` (weights from `duplex fetch`).",
                self.delay_frames as u64 * FRAME_MS
            )),
            catalog: self.catalog.clone(),
        }
    }

    fn slots(&self) -> usize {
        self.slots.len()
    }

    fn open_slot(&mut self, slot_idx: usize, _persona: &Persona) -> Result<Opening, EngineError> {
        let slot = self
            .slots
            .get_mut(slot_idx)
            .ok_or_else(|| EngineError(format!("no slot {slot_idx}")))?;
        slot.reset();
        Ok(Opening::Ready)
    }

    fn close_slot(&mut self, slot_idx: usize) {
        if let Some(slot) = self.slots.get_mut(slot_idx) {
            slot.reset();
        }
    }

    fn step(&mut self, io: StepIo<'_>) -> Result<StageTimes, EngineError> {
        let frames = io
            .input
            .chunks_exact(FRAME_SAMPLES)
            .zip(io.output.chunks_exact_mut(FRAME_SAMPLES));
        for (slot_idx, ((slot, &active), (input, output))) in
            self.slots.iter_mut().zip(io.active).zip(frames).enumerate()
        {
            if !active {
                continue;
            }
            slot.delay(input, output);
            if let Some(frames) = slot.utterance_ended(input) {
                let seconds = (frames as u64 * FRAME_MS) as f64 / 1000.0;
                io.text
                    .push((slot_idx, format!(" [echo: {seconds:.1} s of speech]")));
            }
        }
        Ok(StageTimes::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(
        engine: &mut EchoEngine,
        active: &[bool],
        input: &[f32],
    ) -> (Vec<f32>, Vec<(usize, String)>) {
        let mut output = vec![7.0; input.len()];
        let mut text = Vec::new();
        engine
            .step(StepIo {
                active,
                input,
                output: &mut output,
                text: &mut text,
            })
            .unwrap();
        (output, text)
    }

    fn frame(value: f32) -> Vec<f32> {
        vec![value; FRAME_SAMPLES]
    }

    #[test]
    fn output_is_input_delayed_by_whole_frames() {
        let mut engine = EchoEngine::new(1, 2);
        let persona = PersonaCatalog::builtin()
            .resolve(&Default::default())
            .unwrap();
        engine.open_slot(0, &persona).unwrap();
        let outputs: Vec<f32> = (1..=5)
            .map(|k| step(&mut engine, &[true], &frame(k as f32)).0[0])
            .collect();
        assert_eq!(outputs, vec![0.0, 0.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn zero_delay_copies_and_inactive_slots_are_untouched() {
        let mut engine = EchoEngine::new(2, 0);
        let mut input = frame(0.5);
        input.extend(frame(0.25));
        let (output, _) = step(&mut engine, &[true, false], &input);
        assert_eq!(output[0], 0.5);
        assert_eq!(output[FRAME_SAMPLES], 7.0);
    }

    #[test]
    fn reopening_a_slot_forgets_the_previous_session() {
        let mut engine = EchoEngine::new(1, 1);
        let persona = PersonaCatalog::builtin()
            .resolve(&Default::default())
            .unwrap();
        step(&mut engine, &[true], &frame(0.9));
        engine.open_slot(0, &persona).unwrap();
        assert_eq!(step(&mut engine, &[true], &frame(0.1)).0[0], 0.0);
    }

    #[test]
    fn an_utterance_is_reported_when_it_ends() {
        let mut engine = EchoEngine::new(1, 1);
        let loud = signal::speech_like(FRAME_SAMPLES, 1)
            .iter()
            .map(|s| s + 0.2)
            .collect::<Vec<_>>();
        let mut pieces = Vec::new();
        for idx in 0..10 {
            let input = if idx < 5 { loud.clone() } else { frame(0.0) };
            pieces.extend(step(&mut engine, &[true], &input).1);
        }
        assert_eq!(pieces, vec![(0, " [echo: 0.4 s of speech]".to_owned())]);
    }
}
