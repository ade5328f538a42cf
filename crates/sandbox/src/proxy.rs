//! The agent proxy: the process that owns a VM holds the one agent channel
//! (a virtio-serial port carries one session) and serves the same gRPC
//! service on a Unix socket, so other processes (`start`, `exec`, `kill`...)
//! reach the agent through it.

use std::path::Path;

use agent_proto::agent_server::{Agent, AgentServer};
use agent_proto::*;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::agent::AgentClient;

pub struct AgentProxy {
    client: AgentClient,
}

/// Binds the proxy's socket: once this returns, clients can connect.
pub fn bind(socket: &Path) -> Result<UnixListener, std::io::Error> {
    let _ = std::fs::remove_file(socket);
    UnixListener::bind(socket)
}

/// Serves the proxy on `listener` until `shutdown` completes.
pub async fn serve(
    client: AgentClient,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), std::io::Error> {
    tonic::transport::Server::builder()
        .add_service(AgentServer::new(AgentProxy { client }).max_decoding_message_size(16 << 20))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(std::io::Error::other)
}

#[tonic::async_trait]
impl Agent for AgentProxy {
    async fn version(
        &self,
        req: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        self.client.clone().version(req.into_inner()).await
    }

    async fn create_container(
        &self,
        req: Request<CreateContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.client.clone().create_container(req.into_inner()).await
    }

    async fn start_container(
        &self,
        req: Request<ContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.client.clone().start_container(req.into_inner()).await
    }

    async fn remove_container(
        &self,
        req: Request<ContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.client.clone().remove_container(req.into_inner()).await
    }

    async fn stats_container(
        &self,
        req: Request<ContainerRequest>,
    ) -> Result<Response<ContainerStats>, Status> {
        self.client.clone().stats_container(req.into_inner()).await
    }

    async fn update_container(
        &self,
        req: Request<UpdateContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.client.clone().update_container(req.into_inner()).await
    }

    async fn pause_container(
        &self,
        req: Request<ContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.client.clone().pause_container(req.into_inner()).await
    }

    async fn resume_container(
        &self,
        req: Request<ContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.client.clone().resume_container(req.into_inner()).await
    }

    async fn exec_process(
        &self,
        req: Request<ExecProcessRequest>,
    ) -> Result<Response<ExecProcessResponse>, Status> {
        self.client.clone().exec_process(req.into_inner()).await
    }

    async fn signal_process(
        &self,
        req: Request<SignalProcessRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.client.clone().signal_process(req.into_inner()).await
    }

    async fn wait_process(
        &self,
        req: Request<ProcessRequest>,
    ) -> Result<Response<WaitProcessResponse>, Status> {
        self.client.clone().wait_process(req.into_inner()).await
    }

    async fn remove_process(
        &self,
        req: Request<ProcessRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.client.clone().remove_process(req.into_inner()).await
    }

    async fn list_processes(
        &self,
        req: Request<ContainerRequest>,
    ) -> Result<Response<ListProcessesResponse>, Status> {
        self.client.clone().list_processes(req.into_inner()).await
    }

    async fn resize_tty(&self, req: Request<ResizeTtyRequest>) -> Result<Response<Empty>, Status> {
        self.client.clone().resize_tty(req.into_inner()).await
    }

    async fn configure_network(
        &self,
        req: Request<NetworkRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.client
            .clone()
            .configure_network(req.into_inner())
            .await
    }

    async fn set_identity(&self, req: Request<IdentityRequest>) -> Result<Response<Empty>, Status> {
        self.client.clone().set_identity(req.into_inner()).await
    }

    async fn shutdown(&self, req: Request<Empty>) -> Result<Response<Empty>, Status> {
        self.client.clone().shutdown(req.into_inner()).await
    }

    async fn write_stdin(
        &self,
        req: Request<Streaming<StdinChunk>>,
    ) -> Result<Response<Empty>, Status> {
        let chunks = req.into_inner().map_while(|c| c.ok());
        self.client.clone().write_stdin(chunks).await
    }

    type ReadOutputStream = Streaming<OutputChunk>;

    async fn read_output(
        &self,
        req: Request<ReadOutputRequest>,
    ) -> Result<Response<Self::ReadOutputStream>, Status> {
        self.client.clone().read_output(req.into_inner()).await
    }

    async fn stat_path(&self, req: Request<PathRequest>) -> Result<Response<FileInfo>, Status> {
        self.client.clone().stat_path(req.into_inner()).await
    }

    async fn list_dir(
        &self,
        req: Request<ListDirRequest>,
    ) -> Result<Response<FileInfoList>, Status> {
        self.client.clone().list_dir(req.into_inner()).await
    }

    async fn make_dir(&self, req: Request<PathRequest>) -> Result<Response<FileInfo>, Status> {
        self.client.clone().make_dir(req.into_inner()).await
    }

    async fn move_path(&self, req: Request<MoveRequest>) -> Result<Response<FileInfo>, Status> {
        self.client.clone().move_path(req.into_inner()).await
    }

    async fn remove_path(&self, req: Request<PathRequest>) -> Result<Response<Empty>, Status> {
        self.client.clone().remove_path(req.into_inner()).await
    }

    type ReadFileStream = Streaming<FileChunk>;

    async fn read_file(
        &self,
        req: Request<PathRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        self.client.clone().read_file(req.into_inner()).await
    }

    async fn write_file(
        &self,
        req: Request<Streaming<FileChunk>>,
    ) -> Result<Response<FileInfo>, Status> {
        let chunks = req.into_inner().map_while(|c| c.ok());
        self.client.clone().write_file(chunks).await
    }

    type WatchDirStream = Streaming<WatchEvent>;

    async fn watch_dir(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchDirStream>, Status> {
        self.client.clone().watch_dir(req.into_inner()).await
    }

    type ConnectPortStream = Streaming<PortChunk>;

    async fn connect_port(
        &self,
        req: Request<Streaming<PortChunk>>,
    ) -> Result<Response<Self::ConnectPortStream>, Status> {
        let chunks = req.into_inner().map_while(|c| c.ok());
        self.client.clone().connect_port(chunks).await
    }
}
