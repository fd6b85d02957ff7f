//! The in-memory driver passes the driver contract suite: proof that the suite is not
//! shaped to one backend (the real backends run it in their own crates).

kiln_testkit::contract_tests!(kiln_testkit::contract::Memory::new());
