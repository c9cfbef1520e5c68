//! livemig-kvm: binds livemig-core to KVM, userfaultfd and sockets.
