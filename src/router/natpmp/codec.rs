//! NAT-PMP wire format (placeholder).
