"""The module path of the prefix connector in vLLM's `--kv-transfer-config` (`kv_connector_module_path`), as the
interface contract names it; the connector lives with the rest of the vLLM glue in kvcached.integration.vllm."""
from kvcached.integration.vllm.prefix_connector import KVCachedPrefixConnector, PrefixConnectorMetadata

__all__ = ["KVCachedPrefixConnector", "PrefixConnectorMetadata"]
