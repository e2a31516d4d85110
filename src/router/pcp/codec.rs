//! PCP wire format (placeholder).
