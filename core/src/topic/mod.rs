//! Topics: their config ([`TopicConfig`]) and the registry of topics and partitions
//! ([`TopicRegistry`]), persisted in sled beside the partition logs.

mod config;
mod registry;

pub use config::{altered_overrides, FlushPolicy, TopicConfig};
pub use registry::{
    is_internal, refuse_internal, Topic, TopicError, TopicMeta, TopicRegistry, MAX_PARTITIONS,
    PARTITION_META_TREE, TOPICS_TREE,
};
