"""The identity assertion log: records, hash chain, recorder, writer process, sinks and store."""
