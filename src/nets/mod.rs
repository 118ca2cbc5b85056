//! The networks: the tutorial's `Net` ([`tutorial`]), airbench94's
//! ([`airbench`]), the kind of network a run trains ([`ModelKind`]) and
//! either network loaded from a weights file ([`classifier`]), and either
//! network as an ONNX graph ([`onnx`]).

pub mod airbench;
pub mod classifier;
pub mod onnx;
pub mod tutorial;

use serde::{Deserialize, Serialize};

/// `--model`: which network and recipe a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// The tutorial's Net with its recipe (SGD, batch 4, 2 epochs): about 55 %.
    #[default]
    Net,
    /// airbench94: a whitened BatchNorm ConvNet with its own fast recipe
    /// (batch 1024, 9.9 epochs, test-time augmentation): about 94 %.
    Airbench94,
    /// airbench94-muon: airbench94's network trained by Muon and SGD
    /// (batch 2000, 8 epochs, test-time augmentation): about 94 % sooner.
    #[serde(rename = "airbench94-muon")]
    #[value(name = "airbench94-muon")]
    Airbench94Muon,
}

impl ModelKind {
    pub fn is_net(&self) -> bool {
        *self == ModelKind::Net
    }

    /// The airbench network's variant a fast recipe trains; `None` for `Net`.
    pub fn airbench(self) -> Option<airbench::Variant> {
        use airbench::Variant;
        match self {
            ModelKind::Net => None,
            ModelKind::Airbench94 => Some(Variant::Airbench94),
            ModelKind::Airbench94Muon => Some(Variant::Muon),
        }
    }

    /// The model a fast recipe's variant is.
    pub fn of_airbench(variant: airbench::Variant) -> ModelKind {
        match variant {
            airbench::Variant::Airbench94 => ModelKind::Airbench94,
            airbench::Variant::Muon => ModelKind::Airbench94Muon,
        }
    }

    /// The name in checkpoints' and weights files' metadata.
    pub fn class_name(self) -> &'static str {
        match self {
            ModelKind::Net => "Net",
            ModelKind::Airbench94 => "Airbench94",
            ModelKind::Airbench94Muon => "Airbench94Muon",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Net => "net",
            ModelKind::Airbench94 => "airbench94",
            ModelKind::Airbench94Muon => "airbench94-muon",
        }
    }
}

/// What an exported network returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Head {
    /// The network's output as is: the logits, one per class and image.
    #[default]
    Logits,
    /// The softmax of the logits: each class's probability, summing to 1.
    Probabilities,
}

impl Head {
    /// The name of the output.
    pub fn name(self) -> &'static str {
        match self {
            Head::Logits => "logits",
            Head::Probabilities => "probabilities",
        }
    }
}
