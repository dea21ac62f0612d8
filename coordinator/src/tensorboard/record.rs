//! TensorBoard's file format: `Event` protocol buffers, each framed as a TFRecord. The
//! messages are the subset of `tensorflow/core/util/event.proto` and
//! `tensorflow/core/framework/{summary,tensor}.proto` that scalars and text need, with
//! their field numbers; the rest of each message is left out, which protobuf allows.
use std::io::{self, Write};

/// `tensorboard.Event`: one record of an event file.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub(super) wall_time: f64,
    /// The training step the event describes (TensorBoard's x axis).
    #[prost(int64, tag = "2")]
    pub(super) step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    pub(super) what: Option<What>,
}

/// `Event.what`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub(super) enum What {
    /// The first event of a file: the format version, `brain.Event:2`.
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorboard.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub(super) value: Vec<Value>,
}

/// `Summary.Value`: one tagged value.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Value {
    #[prost(string, tag = "1")]
    pub(super) tag: String,
    #[prost(oneof = "Kind", tags = "2, 8")]
    pub(super) kind: Option<Kind>,
    /// Which plugin shows a tensor (`text`); scalars need none.
    #[prost(message, optional, tag = "9")]
    pub(super) metadata: Option<SummaryMetadata>,
}

/// `Summary.Value.value`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub(super) enum Kind {
    /// A scalar, shown by the scalars dashboard.
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

/// `tensorboard.SummaryMetadata`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub(super) plugin_data: Option<PluginData>,
}

/// `SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct PluginData {
    #[prost(string, tag = "1")]
    pub(super) plugin_name: String,
}

/// `tensorboard.TensorProto`, as a scalar string (no shape means a scalar).
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct TensorProto {
    #[prost(int32, tag = "1")]
    pub(super) dtype: i32,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub(super) string_val: Vec<Vec<u8>>,
}

/// `tensorboard.DataType.DT_STRING`.
pub(super) const DT_STRING: i32 = 7;

/// The first event of every file.
pub(super) const FILE_VERSION: &str = "brain.Event:2";

/// The CRC32C of `data`, masked as TFRecord stores it (a CRC of data that itself holds CRCs
/// is weak, so the stored value is rotated and offset).
pub(super) fn masked_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Writes `data` as one TFRecord: its length (u64, little-endian), the masked CRC of those
/// 8 bytes, the data, the masked CRC of the data.
pub(super) fn write_record(out: &mut impl Write, data: &[u8]) -> io::Result<()> {
    let len = (data.len() as u64).to_le_bytes();
    out.write_all(&len)?;
    out.write_all(&masked_crc(&len).to_le_bytes())?;
    out.write_all(data)?;
    out.write_all(&masked_crc(data).to_le_bytes())
}

/// The records of a whole file, each checked against its CRCs (the tests' reader).
#[cfg(test)]
pub(super) fn read_records(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut records = Vec::new();
    while !bytes.is_empty() {
        let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        if bytes.len() < 12 {
            return Err(format!("{} trailing bytes", bytes.len()));
        }
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        if masked_crc(&bytes[..8]) != u32_at(bytes, 8) {
            return Err(format!("length CRC of record {}", records.len()));
        }
        if bytes.len() < 16 + len {
            return Err(format!("record {} is cut short", records.len()));
        }
        let data = &bytes[12..12 + len];
        if masked_crc(data) != u32_at(bytes, 12 + len) {
            return Err(format!("data CRC of record {}", records.len()));
        }
        records.push(data.to_vec());
        bytes = &bytes[16 + len..];
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn crc32c_and_its_mask_match_known_vectors() {
        // RFC 3720 (iSCSI), B.4, and the common check value of CRC-32C.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c::crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        assert_eq!(crc32c::crc32c(&(0u8..32).collect::<Vec<_>>()), 0x46dd_794e);
        // From TensorBoard's own writer:
        //   from tensorboard.summary.writer.record_writer import masked_crc32c
        //   hex(masked_crc32c(b"123456789")), hex(masked_crc32c(b""))
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
        assert_eq!(masked_crc(b""), 0xa282_ead8);
    }

    #[test]
    fn a_scalar_event_is_framed_byte_for_byte_as_tensorboard_frames_it() {
        // TensorBoard 2.21:
        //   e = event_pb2.Event(wall_time=1.5, step=3, summary=summary_pb2.Summary(value=[
        //       summary_pb2.Summary.Value(tag="loss/cls", simple_value=0.25)]))
        //   b = io.BytesIO(); RecordWriter(b).write(e.SerializeToString()); b.getvalue().hex()
        let expected = hex(
            "1e00000000000000d9dc123209000000000000f83f10032a110a0f0a086c6f73732f636c73150000803e9e10d037",
        );
        let event = Event {
            wall_time: 1.5,
            step: 3,
            what: Some(What::Summary(Summary {
                value: vec![Value {
                    tag: "loss/cls".into(),
                    kind: Some(Kind::SimpleValue(0.25)),
                    metadata: None,
                }],
            })),
        };
        let mut out = Vec::new();
        write_record(&mut out, &event.encode_to_vec()).unwrap();
        assert_eq!(out, expected);
        let records = read_records(&out).unwrap();
        assert_eq!(Event::decode(records[0].as_slice()).unwrap(), event);
    }

    #[test]
    fn the_reader_refuses_a_flipped_bit() {
        let mut out = Vec::new();
        write_record(&mut out, b"abc").unwrap();
        write_record(&mut out, b"").unwrap();
        assert_eq!(read_records(&out).unwrap(), [b"abc".to_vec(), Vec::new()]);
        out[13] ^= 1;
        assert_eq!(read_records(&out).unwrap_err(), "data CRC of record 0");
        out[13] ^= 1;
        out[0] ^= 1;
        assert_eq!(read_records(&out).unwrap_err(), "length CRC of record 0");
    }
}
