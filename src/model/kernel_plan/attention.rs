//! The temporal attention's launch in a kernel plan: which `ring_attention_part_*` variant,
//! ring entries a block and threads a block run one query per row over a full ring, measured
//! per row bucket like the products, and checked against the default launch's output.

use super::{MARGIN, Trial};
use crate::model::decode::AttentionLaunch;
use crate::model::quant::KvQuant;
use serde::{Deserialize, Serialize};

/// A temporal ring the model attends over: its storage, heads, head width and entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Ring {
    pub storage: KvQuant,
    pub heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
}

impl Ring {
    /// `bf16 ring 32x128x3000` (heads, head width, entries).
    pub fn label(&self) -> String {
        format!("{} ring {}", self.kind(), self.dims())
    }

    /// The form `parse` reads: `bf16:32x128x3000`.
    pub fn spec(&self) -> String {
        format!("{}:{}", self.kind(), self.dims())
    }

    fn dims(&self) -> String {
        format!("{}x{}x{}", self.heads, self.head_dim, self.capacity)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a ring like bf16:32x128x3000 or int8:32x128x3000");
        let (kind, dims) = text.split_once(':').ok_or_else(bad)?;
        let storage = match kind {
            "bf16" => KvQuant::None,
            "int8" => KvQuant::Int8,
            _ => return Err(bad()),
        };
        let dims: Vec<usize> = dims
            .split('x')
            .map(|d| d.parse::<usize>().ok().filter(|&d| d > 0))
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        let [heads, head_dim, capacity] = dims[..] else {
            return Err(bad());
        };
        Ok(Self {
            storage,
            heads,
            head_dim,
            capacity,
        })
    }

    fn kind(&self) -> &'static str {
        match self.storage {
            KvQuant::None => "bf16",
            KvQuant::Int8 => "int8",
        }
    }

    /// Bytes of keys and values one row's query reads over the whole ring.
    pub fn bytes_per_row(&self) -> usize {
        let entry = match self.storage {
            KvQuant::None => 2 * self.head_dim,
            KvQuant::Int8 => self.head_dim + 4,
        };
        2 * self.heads * self.capacity * entry
    }
}

/// Every launch's trial on one ring at one row bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttentionChoice {
    pub ring: Ring,
    pub rows: usize,
    pub trials: Vec<Trial<AttentionLaunch>>,
}

impl AttentionChoice {
    pub fn median(&self, launch: AttentionLaunch) -> Option<f64> {
        self.trials
            .iter()
            .find(|t| t.kernel == launch)
            .and_then(Trial::accepted_median)
    }

    /// The fastest launch that ran and agreed with the default, if it beats the default by the
    /// margin; else the default.
    pub fn pick(&self) -> AttentionLaunch {
        let baseline = AttentionLaunch::DEFAULT;
        let Some(base) = self.median(baseline) else {
            return baseline;
        };
        self.trials
            .iter()
            .filter_map(|t| Some((t.kernel, t.accepted_median()?)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .filter(|(_, median)| *median <= MARGIN * base)
            .map_or(baseline, |(launch, _)| launch)
    }
}

/// What launches the attention over rings of one kind, heads and width, by row bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionRoute {
    /// `(bucket, launch)`, by bucket.
    pub launches: Vec<(usize, AttentionLaunch)>,
}

impl AttentionRoute {
    /// The launch for `rows` rows: the smallest bucket holding them, else the largest.
    pub fn launch(&self, rows: usize) -> AttentionLaunch {
        super::for_rows(&self.launches, rows).unwrap_or(AttentionLaunch::DEFAULT)
    }
}

/// The routes of `choices`, one per ring measured (by bucket).
pub fn routes(choices: &[AttentionChoice]) -> Vec<(Ring, AttentionRoute)> {
    let mut rings: Vec<Ring> = choices.iter().map(|c| c.ring).collect();
    rings.sort();
    rings.dedup();
    rings
        .into_iter()
        .map(|ring| {
            let mut launches: Vec<(usize, AttentionLaunch)> = choices
                .iter()
                .filter(|c| c.ring == ring)
                .map(|c| (c.rows, c.pick()))
                .collect();
            launches.sort_by_key(|(rows, _)| *rows);
            (ring, AttentionRoute { launches })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RING: Ring = Ring {
        storage: KvQuant::None,
        heads: 32,
        head_dim: 128,
        capacity: 3000,
    };

    fn launch(spec: &str) -> AttentionLaunch {
        AttentionLaunch::parse(spec).unwrap()
    }

    fn choice(rows: usize, trials: Vec<Trial<AttentionLaunch>>) -> AttentionChoice {
        AttentionChoice {
            ring: RING,
            rows,
            trials,
        }
    }

    #[test]
    fn a_ring_reads_back_from_its_spec_and_bad_ones_say_why() {
        assert_eq!(Ring::parse(&RING.spec()), Ok(RING));
        assert_eq!(RING.label(), "bf16 ring 32x128x3000");
        let int8 = Ring::parse("int8:8x64x100").unwrap();
        assert_eq!(int8.storage, KvQuant::Int8);
        assert_eq!(int8.bytes_per_row(), 2 * 8 * 100 * (64 + 4));
        assert_eq!(RING.bytes_per_row(), 2 * 32 * 3000 * 256);
        for bad in [
            "",
            "bf16",
            "f32:32x128x3000",
            "bf16:32x128",
            "bf16:32x0x3000",
            "bf16:1x2x3x4",
        ] {
            let err = Ring::parse(bad).unwrap_err();
            assert!(err.contains("is not a ring"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_fastest_agreeing_launch_runs_only_beyond_the_margin() {
        let default = AttentionLaunch::DEFAULT;
        let staged = launch("staged,64,128");
        let s2v2 = launch("s2v2,128,128");
        let faster = choice(
            1,
            vec![
                Trial::judged(default, 25.0, 0.0),
                Trial::judged(s2v2, 24.9, 0.001),
                Trial::judged(staged, 15.0, 0.002),
            ],
        );
        assert_eq!(faster.pick(), staged);
        let within_noise = choice(
            1,
            vec![
                Trial::judged(default, 25.0, 0.0),
                Trial::judged(staged, 24.5, 0.002),
            ],
        );
        assert_eq!(within_noise.pick(), default);
        let wrong = choice(
            1,
            vec![
                Trial::judged(default, 25.0, 0.0),
                Trial::judged(staged, 10.0, 0.5),
                Trial::judged(s2v2, 20.0, 0.001),
            ],
        );
        assert_eq!(
            wrong.pick(),
            s2v2,
            "a fast launch with a wrong result never runs"
        );
        let no_baseline = choice(
            1,
            vec![
                Trial::failed(default, "out of memory".into()),
                Trial::judged(staged, 10.0, 0.0),
            ],
        );
        assert_eq!(no_baseline.pick(), default, "nothing can be judged");
    }

    #[test]
    fn a_route_takes_the_smallest_bucket_holding_the_rows_else_the_largest() {
        let staged = launch("staged,64,128");
        let choices = [
            choice(8, vec![Trial::judged(AttentionLaunch::DEFAULT, 9.0, 0.0)]),
            choice(
                1,
                vec![
                    Trial::judged(AttentionLaunch::DEFAULT, 9.0, 0.0),
                    Trial::judged(staged, 5.0, 0.0),
                ],
            ),
        ];
        let routes = routes(&choices);
        assert_eq!(routes.len(), 1);
        let (ring, route) = &routes[0];
        assert_eq!(*ring, RING);
        assert_eq!(route.launch(1), staged);
        assert_eq!(route.launch(2), AttentionLaunch::DEFAULT);
        assert_eq!(route.launch(64), AttentionLaunch::DEFAULT);
        let empty = AttentionRoute {
            launches: Vec::new(),
        };
        assert_eq!(empty.launch(1), AttentionLaunch::DEFAULT);
    }
}
