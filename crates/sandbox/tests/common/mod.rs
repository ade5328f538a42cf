pub mod snapshot_vm;
