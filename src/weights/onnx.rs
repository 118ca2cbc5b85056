//! ONNX model files: the few messages of `onnx/onnx.proto` a feed-forward
//! graph needs, encoded by `prost` from hand-written structs (as the
//! TensorBoard writer does: no `protoc`, no generated code), and a small
//! builder that names every value once and keeps the weights as
//! initializers.
//!
//! `onnx.proto` is proto2: its scalar fields have presence, so the ones
//! that may hold a zero (an attribute's `i`, a dimension of 0) are
//! `Option`s here and are written even when zero, and its repeated scalars
//! are unpacked unless the file says `packed = true`, as here.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, Context, Result};
use prost::Message;
use tch::{Device, Kind, Tensor};

/// The messages of `onnx.proto` (IR version 8 and later), field numbers as
/// there; fields this writer never sets are left out.
pub mod proto {
    /// `onnx.ModelProto`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelProto {
        #[prost(int64, optional, tag = "1")]
        pub ir_version: Option<i64>,
        #[prost(message, repeated, tag = "8")]
        pub opset_import: Vec<OperatorSetIdProto>,
        #[prost(string, optional, tag = "2")]
        pub producer_name: Option<String>,
        #[prost(string, optional, tag = "3")]
        pub producer_version: Option<String>,
        #[prost(string, optional, tag = "4")]
        pub domain: Option<String>,
        #[prost(int64, optional, tag = "5")]
        pub model_version: Option<i64>,
        #[prost(string, optional, tag = "6")]
        pub doc_string: Option<String>,
        #[prost(message, optional, tag = "7")]
        pub graph: Option<GraphProto>,
        #[prost(message, repeated, tag = "14")]
        pub metadata_props: Vec<StringStringEntryProto>,
    }

    /// `onnx.OperatorSetIdProto`: the empty domain is the default `ai.onnx`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OperatorSetIdProto {
        #[prost(string, optional, tag = "1")]
        pub domain: Option<String>,
        #[prost(int64, optional, tag = "2")]
        pub version: Option<i64>,
    }

    /// `onnx.StringStringEntryProto`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StringStringEntryProto {
        #[prost(string, optional, tag = "1")]
        pub key: Option<String>,
        #[prost(string, optional, tag = "2")]
        pub value: Option<String>,
    }

    /// `onnx.GraphProto`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GraphProto {
        #[prost(message, repeated, tag = "1")]
        pub node: Vec<NodeProto>,
        #[prost(string, optional, tag = "2")]
        pub name: Option<String>,
        #[prost(message, repeated, tag = "5")]
        pub initializer: Vec<TensorProto>,
        #[prost(string, optional, tag = "10")]
        pub doc_string: Option<String>,
        #[prost(message, repeated, tag = "11")]
        pub input: Vec<ValueInfoProto>,
        #[prost(message, repeated, tag = "12")]
        pub output: Vec<ValueInfoProto>,
    }

    /// `onnx.NodeProto`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NodeProto {
        #[prost(string, repeated, tag = "1")]
        pub input: Vec<String>,
        #[prost(string, repeated, tag = "2")]
        pub output: Vec<String>,
        #[prost(string, optional, tag = "3")]
        pub name: Option<String>,
        #[prost(string, optional, tag = "4")]
        pub op_type: Option<String>,
        #[prost(message, repeated, tag = "5")]
        pub attribute: Vec<AttributeProto>,
    }

    /// `onnx.AttributeProto`: `type` says which one value field is set.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AttributeProto {
        #[prost(string, optional, tag = "1")]
        pub name: Option<String>,
        #[prost(int32, optional, tag = "20")]
        pub r#type: Option<i32>,
        #[prost(float, optional, tag = "2")]
        pub f: Option<f32>,
        #[prost(int64, optional, tag = "3")]
        pub i: Option<i64>,
        #[prost(bytes = "vec", optional, tag = "4")]
        pub s: Option<Vec<u8>>,
        #[prost(int64, repeated, packed = "false", tag = "8")]
        pub ints: Vec<i64>,
    }

    impl AttributeProto {
        /// `AttributeProto.AttributeType`.
        pub const FLOAT: i32 = 1;
        pub const INT: i32 = 2;
        pub const STRING: i32 = 3;
        pub const INTS: i32 = 7;
    }

    /// `onnx.TensorProto`, its data in `raw_data` (little-endian).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorProto {
        #[prost(int64, repeated, packed = "false", tag = "1")]
        pub dims: Vec<i64>,
        #[prost(int32, optional, tag = "2")]
        pub data_type: Option<i32>,
        #[prost(string, optional, tag = "8")]
        pub name: Option<String>,
        #[prost(bytes = "vec", optional, tag = "9")]
        pub raw_data: Option<Vec<u8>>,
    }

    impl TensorProto {
        /// `TensorProto.DataType`.
        pub const FLOAT: i32 = 1;
        pub const INT64: i32 = 7;
    }

    /// `onnx.ValueInfoProto`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueInfoProto {
        #[prost(string, optional, tag = "1")]
        pub name: Option<String>,
        #[prost(message, optional, tag = "2")]
        pub r#type: Option<TypeProto>,
        #[prost(string, optional, tag = "3")]
        pub doc_string: Option<String>,
    }

    /// `onnx.TypeProto`, a tensor type only.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TypeProto {
        #[prost(oneof = "Value", tags = "1")]
        pub value: Option<Value>,
    }

    /// `TypeProto.value`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        #[prost(message, tag = "1")]
        TensorType(TypeTensor),
    }

    /// `onnx.TypeProto.Tensor`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TypeTensor {
        #[prost(int32, optional, tag = "1")]
        pub elem_type: Option<i32>,
        #[prost(message, optional, tag = "2")]
        pub shape: Option<TensorShapeProto>,
    }

    /// `onnx.TensorShapeProto`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorShapeProto {
        #[prost(message, repeated, tag = "1")]
        pub dim: Vec<Dimension>,
    }

    /// `onnx.TensorShapeProto.Dimension`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dimension {
        #[prost(oneof = "DimensionValue", tags = "1, 2")]
        pub value: Option<DimensionValue>,
    }

    /// `Dimension.value`: a size, or a name for one fixed at run time.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum DimensionValue {
        #[prost(int64, tag = "1")]
        DimValue(i64),
        #[prost(string, tag = "2")]
        DimParam(String),
    }
}

use proto::{AttributeProto, NodeProto, TensorProto};

/// The IR version of opsets 15 to 17 (ONNX 1.10 to 1.12): the oldest
/// that runtimes of the opset [`Graph`]s are written for must accept.
pub const IR_VERSION: i64 = 8;

/// A node attribute.
pub fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeProto::INT),
        i: Some(value),
        ..Default::default()
    }
}

/// A node attribute.
pub fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeProto::INTS),
        ints: values.to_vec(),
        ..Default::default()
    }
}

/// A node attribute.
pub fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeProto::FLOAT),
        f: Some(value),
        ..Default::default()
    }
}

/// A node attribute.
pub fn attr_string(name: &str, value: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeProto::STRING),
        s: Some(value.as_bytes().to_vec()),
        ..Default::default()
    }
}

/// One dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    /// A size named here and fixed at run time (the batch).
    Named(&'static str),
}

/// A float32 graph input or output.
#[derive(Debug, Clone)]
pub struct Io {
    pub name: String,
    pub dims: Vec<Dim>,
    pub doc: String,
}

impl Io {
    fn value_info(&self) -> proto::ValueInfoProto {
        let dim = self
            .dims
            .iter()
            .map(|d| proto::Dimension {
                value: Some(match d {
                    Dim::Fixed(n) => proto::DimensionValue::DimValue(*n),
                    Dim::Named(name) => proto::DimensionValue::DimParam(name.to_string()),
                }),
            })
            .collect();
        proto::ValueInfoProto {
            name: Some(self.name.clone()),
            r#type: Some(proto::TypeProto {
                value: Some(proto::Value::TensorType(proto::TypeTensor {
                    elem_type: Some(TensorProto::FLOAT),
                    shape: Some(proto::TensorShapeProto { dim }),
                })),
            }),
            doc_string: Some(self.doc.clone()),
        }
    }
}

/// A graph under construction: its nodes in order and its initializers.
/// Every value (input, initializer, node output) has one name, given once.
#[derive(Debug, Default)]
pub struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    names: HashSet<String>,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Takes `name` for a value; a second use is a bug in the graph's code.
    fn claim(&mut self, name: &str) {
        assert!(
            self.names.insert(name.to_string()),
            "the graph already has a value named {name}"
        );
    }

    /// Declares a graph input (its name cannot be reused).
    pub fn input(&mut self, name: &str) -> String {
        self.claim(name);
        name.to_string()
    }

    /// `tensor` (float or integer, on any device) as the float32 initializer `name`.
    pub fn weight(&mut self, name: &str, tensor: &Tensor) -> String {
        let t = tensor
            .detach()
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous()
            .view(-1);
        let values = Vec::<f32>::try_from(&t).expect("a float tensor reads as f32");
        self.floats(name, &tensor.size(), &values)
    }

    /// The float32 initializer `name` of shape `dims` (row-major `values`).
    pub fn floats(&mut self, name: &str, dims: &[i64], values: &[f32]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, dims, TensorProto::FLOAT, raw)
    }

    /// A float32 scalar initializer, shared: the first call makes it.
    pub fn scalar(&mut self, name: &str, value: f32) -> String {
        if !self.names.contains(name) {
            self.floats(name, &[], &[value]);
        }
        name.to_string()
    }

    /// The one-dimensional int64 initializer `name`.
    pub fn ints(&mut self, name: &str, values: &[i64]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, &[values.len() as i64], TensorProto::INT64, raw)
    }

    fn initializer(&mut self, name: &str, dims: &[i64], data_type: i32, raw: Vec<u8>) -> String {
        self.claim(name);
        self.initializers.push(TensorProto {
            dims: dims.to_vec(),
            data_type: Some(data_type),
            name: Some(name.to_string()),
            raw_data: Some(raw),
        });
        name.to_string()
    }

    /// Adds the node `op(inputs)` named `name`, whose one output is named
    /// `name` too; returns that name.
    pub fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> String {
        self.node_outputs(op, name, inputs, &[name], attributes);
        name.to_string()
    }

    /// Adds the node `op(inputs)` named `name` with the outputs `outputs`.
    pub fn node_outputs(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) {
        for input in inputs {
            assert!(
                self.names.contains(*input),
                "node {name} reads {input}, which no earlier node, input or initializer defines"
            );
        }
        for output in outputs {
            self.claim(output);
        }
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name: Some(name.to_string()),
            op_type: Some(op.to_string()),
            attribute: attributes,
        });
    }

    /// The graph `name` from `input` to `output` (a value of this graph).
    pub fn finish(self, name: &str, input: &Io, output: &Io) -> proto::GraphProto {
        assert!(
            self.names.contains(&output.name),
            "no node computes the output {}",
            output.name
        );
        proto::GraphProto {
            node: self.nodes,
            name: Some(name.to_string()),
            initializer: self.initializers,
            doc_string: None,
            input: vec![input.value_info()],
            output: vec![output.value_info()],
        }
    }
}

/// What a model file says of itself besides its graph.
#[derive(Debug, Clone)]
pub struct About {
    /// The default domain's opset the graph is written in.
    pub opset: i64,
    pub doc: String,
    /// `metadata_props`, in order.
    pub metadata: Vec<(String, String)>,
}

/// A model of `graph`, produced by tch-cifar at this version.
pub fn model(graph: proto::GraphProto, about: About) -> proto::ModelProto {
    proto::ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(about.opset),
        }],
        producer_name: Some(env!("CARGO_PKG_NAME").to_string()),
        producer_version: Some(env!("CARGO_PKG_VERSION").to_string()),
        domain: None,
        model_version: Some(1),
        doc_string: Some(about.doc),
        graph: Some(graph),
        metadata_props: about
            .metadata
            .into_iter()
            .map(|(key, value)| proto::StringStringEntryProto {
                key: Some(key),
                value: Some(value),
            })
            .collect(),
    }
}

/// Protocol buffers' limit on one message, which ONNX files without
/// external data stay under.
const MAX_MESSAGE_BYTES: usize = (1 << 31) - 1;

/// Writes `model` to `path` as one `.onnx` file, atomically.
pub fn write(model: &proto::ModelProto, path: &Path) -> Result<()> {
    let bytes = model.encode_to_vec();
    if bytes.len() > MAX_MESSAGE_BYTES {
        bail!(
            "cannot write {}: the model takes {} bytes, more than one protobuf message holds",
            path.display(),
            bytes.len()
        );
    }
    crate::util::files::write_atomically(path, |tmp| {
        std::fs::write(tmp, &bytes).with_context(|| format!("cannot write {}", path.display()))
    })
}

/// Reads an `.onnx` file back (for tests and checks).
pub fn read(path: &Path) -> Result<proto::ModelProto> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    proto::ModelProto::decode(bytes.as_slice())
        .with_context(|| format!("{} is not an ONNX model", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_are_written_where_onnx_needs_presence() {
        // `keepdims = 0` must reach the file: an INT attribute without `i`
        // is invalid, and proto3-style encoding would drop the zero.
        let bytes = attr_int("keepdims", 0).encode_to_vec();
        let back = AttributeProto::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.i, Some(0));
        // name (1), type (20) and i (3): field 3, varint, value 0.
        assert!(bytes.windows(2).any(|w| w == [3 << 3, 0]), "{bytes:?}");
    }

    #[test]
    fn repeated_integers_are_unpacked_as_in_onnx_proto() {
        let bytes = attr_ints("pads", &[1, 2]).encode_to_vec();
        // Field 8 as two varint entries (tag 0x40), not one packed run (0x42).
        assert!(bytes.windows(2).any(|w| w == [0x40, 1]), "{bytes:?}");
        assert!(bytes.windows(2).any(|w| w == [0x40, 2]), "{bytes:?}");
        assert!(!bytes.contains(&0x42));
    }

    #[test]
    fn a_graph_round_trips_through_a_file() {
        let mut g = Graph::new();
        let x = g.input("x");
        let w = g.weight(
            "fc.weight",
            &Tensor::from_slice(&[1.5f32, -2.0]).view([1, 2]),
        );
        let y = g.node("Gemm", "fc", &[&x, &w], vec![attr_int("transB", 1)]);
        let input = Io {
            name: x,
            dims: vec![Dim::Named("batch"), Dim::Fixed(2)],
            doc: "in".into(),
        };
        let output = Io {
            name: y,
            dims: vec![Dim::Named("batch"), Dim::Fixed(1)],
            doc: "out".into(),
        };
        let about = About {
            opset: 17,
            doc: "a test".into(),
            metadata: vec![("k".into(), "v".into())],
        };
        let m = model(g.finish("g", &input, &output), about);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        write(&m, &path).unwrap();
        let back = read(&path).unwrap();
        assert_eq!(back, m);
        let graph = back.graph.unwrap();
        let raw = graph.initializer[0].raw_data.as_ref().unwrap();
        assert_eq!(
            raw,
            &[1.5f32.to_le_bytes(), (-2.0f32).to_le_bytes()].concat()
        );
        assert_eq!(graph.initializer[0].dims, [1, 2]);
    }

    #[test]
    #[should_panic(expected = "which no earlier node")]
    fn a_node_may_read_only_defined_values() {
        let mut g = Graph::new();
        g.node("Relu", "r", &["missing"], vec![]);
    }
}
