//! Value types shared by the aggregates.
