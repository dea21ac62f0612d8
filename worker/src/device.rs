//! Parsing `cpu` / `cuda:N` into a tch device, with a clear error when CUDA is not there.
use crate::WorkerError;

/// Parses a device string and checks that it is usable on this machine.
pub fn parse_device(spec: &str) -> Result<tch::Device, WorkerError> {
    let err = |message: String| WorkerError::Device { device: spec.to_string(), message };
    match spec {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => parse_device("cuda:0"),
        _ => {
            let index: usize = spec
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .ok_or_else(|| err("expected `cpu` or `cuda:N`".into()))?;
            let count = tch::Cuda::device_count() as usize;
            if count == 0 {
                return Err(err("CUDA is not available on this machine (no GPU or no driver)".into()));
            }
            if index >= count {
                return Err(err(format!("only {count} CUDA device(s) are visible")));
            }
            Ok(tch::Device::Cuda(index))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_parses_and_garbage_is_named() {
        assert_eq!(parse_device("cpu").unwrap(), tch::Device::Cpu);
        let err = parse_device("tpu:0").unwrap_err().to_string();
        assert!(err.contains("tpu:0") && err.contains("cuda:N"), "{err}");
    }
}
