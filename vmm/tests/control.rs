//! The control socket with real channels (socketpair and a bound path): status, shutdown
//! (the power button's interrupt eventfd fires), kill (the exit signal), bad frames. And a
//! tiny guest spinning on this machine's /dev/kvm that a `kill` request stops.

mod common;

use std::sync::Arc;

use bulkhead_ipc::channel::Channel;
use bulkhead_vmm::control::{ControlRequest, ControlResponse, ControlServer, ControlTarget};
use bulkhead_vmm::devices::acpi::ged::PowerButton;
use bulkhead_vmm::devices::legacy::serial::SerialOut;
use bulkhead_vmm::vm::Vm;
use bulkhead_vmm::vstate::exit::{ExitReason, ExitSignal};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn ask(c: &Channel, req: &ControlRequest) -> ControlResponse {
    c.send(req, &[]).unwrap();
    c.recv::<ControlResponse>().unwrap().0
}

#[test]
fn status_shutdown_kill_over_a_socketpair() {
    let exit = Arc::new(ExitSignal::new().unwrap());
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let button = Arc::new(PowerButton::new(irq.try_clone().unwrap()));
    let target = Arc::new(ControlTarget::new(
        exit.clone(),
        button,
        2,
        256 << 20,
        vec!["host-bridge".into(), "virtio-blk".into()],
    ));
    let (client, server) = Channel::pair().unwrap();
    let _srv = ControlServer::start(target, None, Some(server)).unwrap();

    match ask(&client, &ControlRequest::Status) {
        ControlResponse::Status(s) => {
            assert!(s.running);
            assert_eq!(s.vcpus, 2);
            assert_eq!(s.devices.len(), 2);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        ask(&client, &ControlRequest::Shutdown),
        ControlResponse::Done
    );
    assert_eq!(irq.read().unwrap(), 1, "power button interrupt raised");
    // A frame that is not a request gets an error and the channel stays usable.
    client.send(&(7u32, "nonsense"), &[]).unwrap();
    assert!(matches!(
        client.recv::<ControlResponse>().unwrap().0,
        ControlResponse::Error(_)
    ));
    assert_eq!(ask(&client, &ControlRequest::Kill), ControlResponse::Done);
    assert_eq!(exit.reason(), Some(ExitReason::Killed));
    match ask(&client, &ControlRequest::Status) {
        ControlResponse::Status(s) => {
            assert!(!s.running);
            assert_eq!(s.exit_reason.as_deref(), Some("Killed"));
            assert_eq!(s.power_button_presses, 1);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn kill_stops_a_spinning_guest_through_a_bound_socket() {
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let vm = Vm::new(
        &kvm,
        32 << 20,
        1,
        SerialOut::lines(Box::new(std::io::sink())).unwrap(),
    )
    .unwrap();
    // jmp $ (spin forever)
    vm.memory()
        .write_slice(&[0xeb, 0xfe], GuestAddress(0x1000))
        .unwrap();
    vm.vcpu(0).unwrap().configure_real_mode(0x1000).unwrap();
    let running = vm.start(None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.sock");
    let srv = ControlServer::start(running.control_target(), Some(&path), None).unwrap();
    let client = Channel::connect(&path).unwrap();
    match ask(&client, &ControlRequest::Status) {
        ControlResponse::Status(s) => assert_eq!(s.devices, vec!["host-bridge".to_string()]),
        other => panic!("{other:?}"),
    }
    assert_eq!(ask(&client, &ControlRequest::Kill), ControlResponse::Done);
    let reason = running.wait();
    assert_eq!(reason, ExitReason::Killed);
    // stop() kicks the spinning vCPU out of KVM_RUN and joins it.
    assert_eq!(running.stop(reason).exit_code(), 4);
    drop(srv);
    assert!(!path.exists(), "socket file removed");
}
